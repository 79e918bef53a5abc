"""Where the controller finds its plug-ins: the inference-health gates and the verdict hooks.

``ota rollout controller`` judges the install gates and, when present, every gate function of
``ota.rollout._health.GATES`` and calls every hook that ``ota.rollout._webhook.hooks_from_env()``
returns (webhook URLs and secrets configured by environment). Absent modules mean no extra
gate or hook; a present module that fails to import is an error (fail closed: a controller
that cannot load its health gates must not promote on install outcomes alone).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ._context import GateFn


def _module(name: str) -> Any:
    full = f"ota.rollout.{name}"
    if importlib.util.find_spec(full) is None:
        return None
    return importlib.import_module(full)


def extra_gates() -> list[GateFn]:
    mod = _module("_health")
    return list(getattr(mod, "GATES", ())) if mod is not None else []


def verdict_hooks() -> list[Any]:
    mod = _module("_webhook")
    fn = getattr(mod, "hooks_from_env", None) if mod is not None else None
    return list(fn()) if callable(fn) else []
