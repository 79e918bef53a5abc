"""Security review of the install gate's deferral of too-small tiers (ADR 0011, rollgate).

Attacked on real rows (SQLite and PostgreSQL): the most forgers the threat model allows
(``min_devices - 1``), all admitted to the stage, all reporting success and all ceasing to
claim the model (``device_models`` comes from reports), cannot turn two honest failures of a
small tier into a deferral; a population read that fails defers nothing (the gate raises, the
controller holds that rollout for the tick), and without a session nothing is deferred.
No finding: these pin the behaviour the review confirmed.
"""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ota.fleet._models import DeviceModel
from ota.rollout._context import RolloutContext
from ota.rollout._gates import Want, count_outcomes_many, install_gates
from ota.rollout._verdict import Action, GateStatus
from tests.fleet_fixtures import fleet_backend, postgres  # noqa: F401
from tests.test_rollout_gates import (
    MODEL,
    NEW,
    OLD,
    T0,
    World,
    gate,
    good_tier_a,
    ids_in,
    verdict,
    world,  # noqa: F401
)


def test_the_most_forgers_allowed_cannot_defer_two_honest_failures(world: World) -> None:  # noqa: F811
    w = world
    good_tier_a(w)
    # tier b: the stage admits 4 honest devices (2 fail, 2 succeed) and 4 forgers
    # (min_devices - 1) who report success and stop claiming the model: the tier looks too
    # small (4 admitted) and diluted (6 of 8 confirmed)
    w.add(ids_in("bf", 2, 0, 10), "b", "smoke_failed")
    w.add(ids_in("bc", 2, 0, 10), "b", "confirmed")
    w.add(ids_in("bx", 4, 0, 10), "b", "confirmed", runs=False)
    w.add(ids_in("bo", 8, 10, 100), "b", None)
    results = w.judge(0)
    b = gate(results, "install.failures", "b")
    assert b.evidence["admitted_devices"] == 4
    assert b.status is GateStatus.HOLD and b.evidence["not_deferred"] == "conclusive", b.reason
    assert verdict(results) is Action.HOLD


def test_a_population_read_that_fails_defers_nothing(world: World) -> None:  # noqa: F811
    w = world
    good_tier_a(w)
    w.add(ids_in("b", 2, 0, 10), "b", "confirmed")
    w.add(ids_in("bx", 1, 0, 10), "b", "smoke_failed")  # one failure: deferred when read
    w.add(ids_in("bo", 6, 10, 100), "b", None)
    assert gate(w.judge(0), "install.failures", "b").status is GateStatus.PASS
    st = w.plan.stages[0]
    ctx = RolloutContext(1, MODEL, NEW, OLD, 0, st.ring, st.percent, T0 - 7200, T0 + 60)
    with Session(w.engine) as s:
        out = count_outcomes_many(s, [Want(1, MODEL, NEW, st.ring, T0 - 6 * 3600)])[1]
    # no session and no population: the tier holds (fail closed)
    results = install_gates(None, ctx, w.plan, st, out)
    assert gate(results, "install.failures", "b").status is GateStatus.HOLD
    assert verdict(results) is Action.HOLD
    # the population read fails (its table is gone): the gate raises, it never passes
    DeviceModel.__table__.drop(w.engine)  # type: ignore[attr-defined]
    with Session(w.engine) as s, pytest.raises(sa_exc.SQLAlchemyError):
        install_gates(s, ctx, w.plan, st, out)
