"""Where the controller finds its plug-ins: the inference-health gates and the verdict hooks.

``ota rollout controller`` judges the install gates and the inference-health gates of
``ota.rollout._health`` (its ``GATES`` when the module exports them, else one gate that runs
:func:`~ota.rollout._health.evaluate_health` with the plan's ``[gates.health]`` table), and
calls every hook of ``ota.rollout._webhook`` (its ``hooks_from_env()`` when exported, else one
hook built from ``OTA_WEBHOOK_URL``/``OTA_WEBHOOK_SECRET`` that puts each verdict in the outbox
and delivers what is due).

Invariants: a plug-in module that is absent means no extra gate or hook; one that is present
but fails to import, or a webhook configured without a valid secret, is an error (fail closed:
a controller that cannot load its health gates must not promote on install outcomes alone, and
a configured webhook is never silently dropped).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ._context import GateFn, RolloutContext
from ._verdict import GateResult

VerdictHook = Callable[[dict[str, Any]], None]
log = logging.getLogger("ota.rollout")


def _module(name: str) -> Any:
    full = f"ota.rollout.{name}"
    if importlib.util.find_spec(full) is None:
        return None
    return importlib.import_module(full)


def health_gate(session: Session, ctx: RolloutContext) -> list[GateResult]:
    """Every inference-health gate of one stage, thresholds from the plan's
    ``[gates.health]`` (``ctx.health``). Judged without the release's signed reference (the
    controller's gate contract carries no release); the baseline comparison still runs."""
    from ._health import evaluate_health

    return evaluate_health(session, ctx, health_thresholds(ctx.health))


def health_thresholds(table: Mapping[str, float]) -> Any:
    """The plan's ``[gates.health]`` as the health gates' thresholds. The plan parser keeps
    every value as a float (``min_devices = 5`` is ``5.0``); the integer thresholds take it
    back as an integer when it is integral (a fraction stays a float and is refused there).

    Raises:
        InputError: an unknown key or a value out of range (the gate then holds, never passes).
    """
    from ._health import HealthThresholds

    ints = {f.name for f in fields(HealthThresholds) if isinstance(f.default, int)}
    doc = {
        k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v
        for k, v in table.items()
    }
    return HealthThresholds.from_mapping(doc)


def extra_gates() -> list[GateFn]:
    mod = _module("_health")
    if mod is None:
        return []
    gates = getattr(mod, "GATES", None)
    if gates is not None:
        return list(gates)
    if not callable(getattr(mod, "evaluate_health", None)):
        raise ImportError("ota.rollout._health exports neither GATES nor evaluate_health")
    return [health_gate]


def _outbox_hook(engine: Engine, cfg: Any) -> VerdictHook:
    from ._webhook import deliver_due, enqueue

    def webhook(doc: dict[str, Any]) -> None:
        with Session(engine) as s, s.begin():
            enqueue(s, "rollout.verdict", {"event": "rollout.verdict", **doc})
        got = deliver_due(engine, cfg)
        if got.retrying or got.dead:
            log.warning("webhook: %d to retry, %d dead", len(got.retrying), len(got.dead))

    return webhook


def verdict_hooks(engine: Engine | None = None) -> list[VerdictHook]:
    """The verdict hooks; ``engine`` (the fleet database) holds the webhook outbox.

    Raises:
        ConfigError: a webhook URL without a valid secret, or with no database to queue in.
    """
    mod = _module("_webhook")
    if mod is None:
        return []
    fn = getattr(mod, "hooks_from_env", None)
    if callable(fn):
        takes_engine = bool(inspect.signature(fn).parameters)
        return list(fn(engine) if takes_engine and engine is not None else fn())
    cfg = mod.WebhookConfig.from_env()
    if cfg is None:
        return []
    if engine is None:
        from ota.errors import ConfigError

        raise ConfigError("a webhook is configured but the controller has no fleet database")
    return [_outbox_hook(engine, cfg)]
