"""The shared rule that turns gate results into a stage's action (ota.rollout._verdict)."""

from __future__ import annotations

import json
import math

import pytest

from ota.rollout._verdict import Action, GateResult, GateStatus, combine


def _r(status: GateStatus, gate: str = "g") -> GateResult:
    return GateResult(gate=gate, status=status, reason="r", value=1.0, threshold=2.0)


def test_silence_never_promotes() -> None:
    assert combine([], Action.PAUSE) is Action.HOLD


def test_any_failure_decides_even_among_passes() -> None:
    rs = [_r(GateStatus.PASS), _r(GateStatus.HOLD), _r(GateStatus.FAIL)]
    assert combine(rs, Action.ROLLBACK) is Action.ROLLBACK
    assert combine(rs, Action.PAUSE) is Action.PAUSE


def test_a_hold_waits_and_only_all_passes_promote() -> None:
    assert combine([_r(GateStatus.PASS), _r(GateStatus.HOLD)], Action.PAUSE) is Action.HOLD
    assert combine([_r(GateStatus.PASS), _r(GateStatus.PASS)], Action.PAUSE) is Action.PROMOTE


@pytest.mark.parametrize("bad", [Action.PROMOTE, Action.HOLD])
def test_on_failure_must_stop_the_release(bad: Action) -> None:
    with pytest.raises(ValueError, match="on_failure"):
        combine([_r(GateStatus.FAIL)], bad)


@pytest.mark.parametrize("field", ["value", "threshold", "baseline", "confidence"])
def test_non_finite_figures_are_refused(field: str) -> None:
    figures: dict[str, float | None] = dict.fromkeys(("value", "threshold", "baseline"), 1.0)
    figures["confidence"] = 0.5
    figures[field] = math.nan
    with pytest.raises(ValueError, match="finite"):
        GateResult(
            "g",
            GateStatus.PASS,
            "r",
            figures["value"],
            figures["threshold"],
            figures["baseline"],
            figures["confidence"],
        )


def test_confidence_is_a_probability() -> None:
    with pytest.raises(ValueError, match="confidence"):
        GateResult(gate="g", status=GateStatus.PASS, reason="r", confidence=1.5)


def test_to_json_round_trips_through_json() -> None:
    r = GateResult(
        gate="latency_p95",
        status=GateStatus.FAIL,
        reason="p95 +31%",
        value=1.31,
        threshold=1.2,
        baseline=1.0,
        confidence=0.99,
        tier="jetson",
        evidence={"devices": 40, "inferences": 12000},
    )
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["status"] == "fail" and doc["tier"] == "jetson"
    assert doc["evidence"] == {"devices": 40, "inferences": 12000}
