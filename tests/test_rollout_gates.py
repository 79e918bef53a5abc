"""Install-outcome gates for tiers a stage admits too few devices of (issue 9, ADR 0011/0015),
on real database rows, SQLite and PostgreSQL.

A tier the stage cannot judge (fewer than ``gates.install.min_devices`` of its devices that
run the model admitted, by the client's own bucket rule) is deferred like the health gates'
tiers — unless its failures are conclusive; a security refusal still halts at once; fewer
forged devices than the minimum flip nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from ota.client._policy import bucket
from ota.fleet._models import Device, DeviceModel, ReleaseState
from ota.rollout._context import RolloutContext
from ota.rollout._gates import (
    CONCLUSIVE,
    Counts,
    conclusive,
    count_outcomes,
    install_gates,
    needs_population,
)
from ota.rollout._plan import Plan, plan_from_toml
from ota.rollout._verdict import Action, GateResult, GateStatus, combine
from tests.fleet_fixtures import fleet_backend, postgres  # noqa: F401

MODEL, NEW, OLD = "m", "2.0.0", "1.0.0"
T0 = time.time()

PLAN = """
format = "edge-ota.rollout-plan/1"
on_failure = "pause"
device_timeout = "6h"
stage_deadline = "3d"

[[stages]]
ring = "canary"
percent = 10
min_devices = 5
soak = "1h"

[[stages]]
ring = "canary"
percent = 100
min_devices = 5
soak = "1h"

[[stages]]
ring = "pilot"
percent = 100
min_devices = 5
soak = "1h"

[gates.install]
max_failure_rate = 0.05
min_devices = 5
security_min_devices = 2

[gates.health]
enabled = 0
"""


def ids_in(prefix: str, count: int, lo: float, hi: float) -> list[str]:
    """``count`` device ids whose percentage bucket for ``m 2.0.0`` is in ``[lo, hi)``."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        i += 1
        if lo <= bucket(f"{prefix}{i}", MODEL, NEW) < hi:
            out.append(f"{prefix}{i}")
    return out


class World:
    """Enrolled devices with the rows the install gates read: ``devices``,
    ``device_models`` (who runs the model: the tier's population) and ``release_states``."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.n = 0
        self.plan: Plan = plan_from_toml(PLAN)

    def add(
        self, ids: list[str], tier: str, state: str | None, *, ring: str = "canary",
        runs: bool = True,
    ) -> None:  # fmt: skip
        """Devices ``ids`` of ``ring`` and ``tier``; ``state``: their latest state of the new
        release (``None``: still on the old one); ``runs``: they claim to run the model."""
        with Session(self.engine) as s, s.begin():
            for did in ids:
                self.n += 1
                dev = Device(
                    device_id=did, credential_hash=f"{self.n:064d}", ring=ring, tier=tier,
                    enrolled_at=T0 - 86400, health="ok", events_total=0, dropped_total=0,
                    rate_window_start=0.0, rate_count=0,
                )  # fmt: skip
                s.add(dev)
                s.flush()
                version = NEW if state == "confirmed" else OLD
                if runs:
                    s.add(DeviceModel(device_pk=dev.id, model=MODEL, version=version,
                                      counter=1, updated_at=T0, ring=ring, tier=tier,
                                      active=True))  # fmt: skip
                if state is not None:
                    s.add(ReleaseState(device_pk=dev.id, model=MODEL, version=NEW, state=state,
                                       updated_at=T0, active=True))  # fmt: skip

    def judge(self, stage: int) -> list[GateResult]:
        st = self.plan.stages[stage]
        ctx = RolloutContext(1, MODEL, NEW, OLD, stage, st.ring, st.percent, T0 - 7200, T0 + 60)
        with Session(self.engine) as s:
            return install_gates(s, ctx, self.plan, st)

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def world(fleet_backend: str) -> Iterator[World]:  # noqa: F811
    w = World(fleet_backend)
    yield w
    w.close()


def gate(results: list[GateResult], name: str, tier: str = "") -> GateResult:
    [r] = [r for r in results if r.gate == name and r.tier == tier]
    return r


def verdict(results: list[GateResult]) -> Action:
    return combine(results, Action.PAUSE)


def good_tier_a(w: World) -> None:
    """Eight confirmed devices of tier a in the 10 % bucket (the stage's sample), and eight
    outside it."""
    w.add(ids_in("a", 8, 0, 10), "a", "confirmed")
    w.add(ids_in("ao", 8, 10, 100), "a", None)


def test_a_too_small_tier_with_one_failure_is_deferred_then_judged_at_the_next_stage(
    world: World,
) -> None:
    w = world
    good_tier_a(w)
    inside = ids_in("b", 3, 0, 10)  # the 10 % stage admits 3 of tier b's 9 devices
    w.add(inside[:2], "b", "confirmed")
    w.add(inside[2:], "b", "smoke_failed")
    outside = ids_in("bo", 6, 10, 100)
    w.add(outside, "b", None)
    results = w.judge(0)
    b = gate(results, "install.failures", "b")
    assert b.status is GateStatus.PASS, b.to_json()
    assert b.reason.startswith(
        "tier b: 3 device(s) in this stage < min_devices 5: judged in the next stage"
    )
    assert b.evidence["admitted_devices"] == 3 and b.evidence["failed"] == 1
    assert "too few to judge" in b.evidence["held_because"]
    assert b.evidence["confidence_above_rate"] < CONCLUSIVE
    assert verdict(results) is Action.PROMOTE, [r.to_json() for r in results]
    # the counts alone (the controller's cached path) cannot defer: fail closed, a hold
    with Session(w.engine) as s:
        out = count_outcomes(s, MODEL, NEW, "canary", T0 - 6 * 3600)
    assert needs_population(out, w.plan)
    st = w.plan.stages[0]
    ctx = RolloutContext(1, MODEL, NEW, OLD, 0, "canary", 10.0, T0 - 7200, T0 + 60)
    alone = install_gates(None, ctx, w.plan, st, out)
    assert gate(alone, "install.failures", "b").status is GateStatus.HOLD
    # the next stage (100 % of the ring) admits all 9: the failure is judged (held until
    # min_devices agree, as for any tier large enough) ...
    nxt = w.judge(1)
    assert gate(nxt, "install.failures", "b").status is GateStatus.HOLD
    assert "deferred" not in gate(nxt, "install.failures", "b").evidence
    assert verdict(nxt) is Action.HOLD
    # ... and when tier b's other devices fail there too, it halts
    w.add(ids_in("bf", 4, 10, 100), "b", "reverted")
    failed = gate(w.judge(1), "install.failures", "b")
    assert failed.status is GateStatus.FAIL and failed.evidence["failed"] == 5
    assert verdict(w.judge(1)) is Action.PAUSE


def test_at_100_percent_a_tier_smaller_than_the_minimum_is_deferred_to_the_later_stages(
    world: World,
) -> None:
    w = world
    w.add(ids_in("a", 8, 0, 100), "a", "confirmed")
    w.add(ids_in("c", 3, 0, 100), "c", "confirmed")
    w.add(ids_in("cf", 1, 0, 100), "c", "failed")  # the ring holds 4 devices of tier c
    c = gate(w.judge(1), "install.failures", "c")
    assert c.status is GateStatus.PASS
    assert "judged with the tier's devices of the later stages" in c.reason
    # its failure is still counted at the next stage (over every ring)
    w.add(ids_in("p", 6, 0, 100), "c", "confirmed", ring="pilot")
    later = gate(w.judge(2), "install.failures", "c")
    assert later.status is GateStatus.HOLD and later.evidence["failed"] == 1


def test_a_tier_whose_admitted_devices_all_fail_smoke_still_halts(world: World) -> None:
    w = world
    good_tier_a(w)
    w.add(ids_in("b", 3, 0, 10), "b", "smoke_failed")
    w.add(ids_in("bo", 6, 10, 100), "b", None)
    results = w.judge(0)
    b = gate(results, "install.failures", "b")
    assert b.status is GateStatus.HOLD, b.to_json()
    assert "conclusive" in b.reason and b.evidence["not_deferred"] == "conclusive"
    assert b.confidence is not None and b.confidence >= CONCLUSIVE
    assert verdict(results) is Action.HOLD  # never promotes; its deadline pauses it
    # two more of tier b fail in the next ring: min_devices failed devices agree, it halts
    w.add(ids_in("p", 2, 0, 100), "b", "smoke_failed", ring="pilot")
    b = gate(w.judge(0), "install.failures", "b")
    assert b.status is GateStatus.FAIL and b.evidence["failed"] == 5
    assert verdict(w.judge(0)) is Action.PAUSE


def test_a_security_refusal_in_a_too_small_tier_halts_at_once(world: World) -> None:
    w = world
    good_tier_a(w)
    w.add(ids_in("b", 1, 0, 10), "b", "security")
    assert gate(w.judge(0), "install.security").status is GateStatus.HOLD  # one alone
    w.add(ids_in("bs", 1, 0, 10), "b", "security")
    results = w.judge(0)
    assert gate(results, "install.security").status is GateStatus.FAIL
    assert verdict(results) is Action.PAUSE


def test_what_is_conclusive() -> None:
    p = plan_from_toml(PLAN)

    def sure(confirmed: int, failed: int) -> bool:
        return conclusive(Counts(confirmed=confirmed, failed=failed), p) >= CONCLUSIVE

    # one failure is never conclusive at 5 % (95 % sure), whatever the tier's size
    assert not any(sure(k, 1) for k in range(0, 10))
    # two failures are, among up to 2 + (min_devices - 1) + 1 executed devices ...
    assert sure(0, 2) and sure(3, 2) and sure(5, 2)
    # ... and the min_devices - 1 confirmed devices most in its favour are set aside
    assert conclusive(Counts(confirmed=4, failed=2), p) == conclusive(Counts(failed=2), p)
    assert not sure(8, 2)
    assert sure(0, 3) and sure(1, 4)
    zero = plan_from_toml(PLAN.replace("max_failure_rate = 0.05", "max_failure_rate = 0.0"))
    assert conclusive(Counts(confirmed=3, failed=1), zero) == 1.0  # the plan tolerates none
    assert conclusive(Counts(confirmed=3), p) == 0.0


def test_a_forged_minority_flips_nothing_in_a_small_tier(world: World) -> None:
    w = world
    good_tier_a(w)
    # a good release: one forged failure in a small tier is deferred (it promotes) ...
    w.add(ids_in("b", 1, 0, 10), "b", "confirmed")
    w.add(ids_in("bx", 1, 0, 10), "b", "smoke_failed")
    w.add(ids_in("bo", 6, 10, 100), "b", None)
    assert gate(w.judge(0), "install.failures", "b").status is GateStatus.PASS
    assert verdict(w.judge(0)) is Action.PROMOTE
    # ... and three (4 admitted, fewer than min_devices 5) hold at most (conclusive: not
    # deferred), never halt
    w.add(ids_in("by", 2, 0, 10), "b", "smoke_failed")
    results = w.judge(0)
    b = gate(results, "install.failures", "b")
    assert b.status is GateStatus.HOLD and b.evidence["admitted_devices"] == 4
    assert verdict(results) is Action.HOLD
    # a bad release on tier c (2 of 2 admitted fail): four forged successes of tier c from
    # another ring do not dilute it into a deferral
    w.add(ids_in("c", 2, 0, 10), "c", "smoke_failed")
    w.add(ids_in("co", 6, 10, 100), "c", None)
    c = gate(w.judge(0), "install.failures", "c")
    assert c.status is GateStatus.HOLD and c.evidence["not_deferred"] == "conclusive"
    w.add(ids_in("cy", 4, 0, 100), "c", "confirmed", ring="pilot")
    c = gate(w.judge(0), "install.failures", "c")
    assert c.status is GateStatus.HOLD and c.evidence["not_deferred"] == "conclusive"
    assert c.evidence["confirmed"] == 4 and c.evidence["failed"] == 2


def test_forged_devices_that_shrink_a_tier_defer_no_failing_tier(world: World) -> None:
    w = world
    good_tier_a(w)
    # a bad release on tier b: the stage admits 6 of tier b; 4 honest devices fail, and 2
    # forgers report success and stop claiming the model (their tier then looks too small)
    w.add(ids_in("b", 4, 0, 10), "b", "smoke_failed")
    w.add(ids_in("bx", 2, 0, 10), "b", "confirmed", runs=False)
    w.add(ids_in("bo", 8, 10, 100), "b", None)
    b = gate(w.judge(0), "install.failures", "b")
    assert b.evidence["admitted_devices"] == 4
    assert b.status is GateStatus.HOLD and b.evidence["not_deferred"] == "conclusive"
    assert verdict(w.judge(0)) is Action.HOLD
