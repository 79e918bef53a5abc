"""The vocabulary every gate and the controller share: a gate's result and a stage's verdict.

Invariants:

* a gate never turns silence into success: too little data is ``HOLD``, never ``PASS``;
* ``evidence`` holds only JSON values (it is written to the audit log and sent in webhooks
  as it is), and is bounded by the gate that builds it;
* a verdict's action is derived from its gates by :func:`combine` alone, so the rule
  "any failure decides, any hold waits, only all passes promote" lives in one place.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class GateStatus(enum.Enum):
    """What one gate says about one stage (and tier) at one evaluation."""

    PASS = "pass"  # noqa: S105 (a gate status, not a password)
    HOLD = "hold"  # not enough data, or not yet sure either way
    FAIL = "fail"


class Action(enum.Enum):
    """What the controller does with a stage after an evaluation."""

    PROMOTE = "promote"  # every gate passed: move to the next stage
    HOLD = "hold"  # wait for more data (a stage past its deadline pauses instead)
    PAUSE = "pause"  # stop offering the release; devices keep what they run
    ROLLBACK = "rollback"  # yank: devices on the release revert by themselves


@dataclass(frozen=True)
class GateResult:
    """One gate's finding.

    ``value`` is what was measured, ``threshold`` the limit it is held to, ``baseline`` the
    same figure on the concurrent baseline (devices of the same ring and tier still on the
    previous release) when the gate compares, ``confidence`` in ``[0, 1]`` how sure the
    statistical test is of a failure (or of health, for a pass), ``None`` when not applicable.
    ``tier`` is ``""`` for a gate judged over the whole stage.
    """

    gate: str
    status: GateStatus
    reason: str
    value: float | None = None
    threshold: float | None = None
    baseline: float | None = None
    confidence: float | None = None
    tier: str = ""
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("value", "threshold", "baseline", "confidence"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"gate {self.gate}: {name} must be finite, got {v!r}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"gate {self.gate}: confidence {self.confidence} not in [0, 1]")

    def deferred(self, why: str, **evidence: Any) -> GateResult:
        """This tier HOLD turned into a PASS whose reason says why the tier is judged later
        (ADR 0011/0015: a tier the stage admits too few of); the figures are kept, the
        confidence dropped, and the evidence records ``why`` and the hold's own reason."""
        return GateResult(
            self.gate,
            GateStatus.PASS,
            why,
            self.value,
            self.threshold,
            self.baseline,
            None,
            self.tier,
            {**self.evidence, **evidence, "deferred": why, "held_because": self.reason},
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON object for the audit log, the API and webhooks."""
        return {
            "gate": self.gate,
            "tier": self.tier,
            "status": self.status.value,
            "reason": self.reason,
            "value": self.value,
            "threshold": self.threshold,
            "baseline": self.baseline,
            "confidence": self.confidence,
            "evidence": dict(self.evidence),
        }


def combine(results: Iterable[GateResult], on_failure: Action) -> Action:
    """The stage's action from its gates' results.

    Any ``FAIL`` gives ``on_failure`` (``PAUSE`` or ``ROLLBACK``, from the plan); otherwise any
    ``HOLD`` gives ``HOLD``; only a non-empty set of passes gives ``PROMOTE`` (no gates at all is
    silence, and silence never promotes).
    """
    if on_failure not in (Action.PAUSE, Action.ROLLBACK):
        raise ValueError(f"on_failure must be pause or rollback, not {on_failure.value}")
    statuses = [r.status for r in results]
    if GateStatus.FAIL in statuses:
        return on_failure
    if not statuses or GateStatus.HOLD in statuses:
        return Action.HOLD
    return Action.PROMOTE
