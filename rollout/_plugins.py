"""Where the controller finds its plug-ins: the inference-health gates and the verdict hooks.

``ota rollout controller`` judges the install gates and every gate function of
``ota.rollout._health.GATES`` (they read the plan's ``[gates.health]`` from ``ctx.health``),
and calls every hook that ``ota.rollout._webhook.hooks_from_env(engine=...)`` returns (the
webhook URL and secret from the environment; the verdicts queue in the fleet database the
controller uses).

Invariants: a plug-in module that is absent means no extra gate or hook; one that is present
but fails to import, or lacks what it must export, is an error (fail closed: a controller that
cannot load its health gates must not promote on install outcomes alone); a webhook configured
without a valid secret is refused at start-up, never sent unsigned.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from ._context import GateFn

VerdictHook = Callable[[dict[str, Any]], None]


def _module(name: str) -> Any:
    full = f"ota.rollout.{name}"
    if importlib.util.find_spec(full) is None:
        return None
    return importlib.import_module(full)


def extra_gates() -> list[GateFn]:
    """The health gates. Raises ImportError when the module is present without ``GATES``."""
    mod = _module("_health")
    if mod is None:
        return []
    gates = getattr(mod, "GATES", None)
    if gates is None:
        raise ImportError("ota.rollout._health does not export GATES")
    return list(gates)


def verdict_hooks(engine: Engine | None = None) -> list[VerdictHook]:
    """The verdict hooks; ``engine``: the fleet database the webhook outbox lives in.

    Raises:
        ConfigError: a webhook URL without a valid secret.
        ImportError: the webhook module is present without ``hooks_from_env``.
    """
    mod = _module("_webhook")
    if mod is None:
        return []
    fn = getattr(mod, "hooks_from_env", None)
    if not callable(fn):
        raise ImportError("ota.rollout._webhook does not export hooks_from_env")
    return list(fn(engine=engine))
