"""One controller tick over many live rollouts: grouped reads and reused judgements.

Real parts as in ``tests/test_rollout_controller.py`` (its repository and fleet fixtures: a
real repository steered with the online key, the fleet database on SQLite and PostgreSQL,
reports through the service's own parser and ingest). What is proved: the grouped install
counts equal the per-rollout ones; the extra gates are judged again exactly when their inputs
may have changed (a telemetry summary, an enrolment, a new stage, ``refresh_s``) and reused
otherwise; a deadline passing is acted on at its tick while the gates are reused; a gate that
raised is never reused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session

from ota.bundle import RolloutState
from ota.fleet._telemetry import BUCKET_S
from ota.repository import Project
from ota.repository._auditlog import ANCHOR_CUSTOM_KEY, ANCHOR_TARGET, read_log, verify_chain
from ota.repository._ops import model_index
from ota.repository._txn import Transaction
from ota.rollout import _controller, _store
from ota.rollout._context import RolloutContext
from ota.rollout._controller import Controller
from ota.rollout._gates import Want, count_outcomes, count_outcomes_many
from ota.rollout._plan import plan_from_toml
from ota.rollout._verdict import GateResult, GateStatus
from tests.fleet_fixtures import fleet_backend, new_db, postgres  # noqa: F401
from tests.test_rollout_controller import (  # noqa: F401 - fixtures
    Fleet,
    any_fleet,
    plan,
    project,
    published,
    signed,
    sqlite_fleet,
)
from tests.test_rollout_health import Behaviour, make_summary

SHORT = """
on_failure = "pause"
device_timeout = "1h"
[[stages]]
ring = "canary"
percent = 100
min_devices = 1
soak = "1m"
deadline = "2m"
[[stages]]
ring = "ga"
percent = 100
min_devices = 1
soak = 0
"""


def start_of_bucket() -> float:
    """A clock for the ticks that stays inside the current telemetry bucket for 800 s (the
    controller judges the extra gates again at each bucket boundary)."""
    return float(int(time.time() // BUCKET_S) * BUCKET_S + 1)


class Counting:
    """An extra gate that counts its calls and holds (or passes)."""

    def __init__(self, status: GateStatus = GateStatus.HOLD) -> None:
        self.calls: list[float] = []
        self.status = status
        self.__name__ = "counting"

    def __call__(self, _s: Session, ctx: RolloutContext) -> list[GateResult]:
        self.calls.append(ctx.now)
        return [GateResult("health.test", self.status, f"call {len(self.calls)}", tier="cpu")]


def telemetry(f: Fleet, device: str, version: str = "1.0.0") -> None:
    """One inference-telemetry summary of ``m`` through the service's ingest."""
    doc: dict[str, Any] = make_summary(np.random.default_rng(1), version, Behaviour())
    now = time.time()
    doc.update(model="m", version=version, start=now - 60, end=now, outputs=[])
    f.report(device, "telemetry", version=version, summary=doc)


def snapshot_version(proj: Project) -> int:
    txn = Transaction.begin(proj.storage, proj.signers, proj.expiry())
    return int(txn.snapshot.signed.version)


def anchored_seq(proj: Project) -> int:
    txn = Transaction.begin(proj.storage, proj.signers, proj.expiry())
    info = txn.targets(txn.bin_for(ANCHOR_TARGET)).signed.targets[ANCHOR_TARGET]
    return int(info.custom[ANCHOR_CUSTOM_KEY]["seq"])


def signed_of(proj: Project, model: str, version: str = "2.0.0") -> RolloutState:
    index = model_index(proj, model)
    assert index is not None
    state = index.get(version)
    assert state is not None
    return state


def test_the_bucket_width_is_the_fleets() -> None:
    assert _controller.BUCKET_S == BUCKET_S


def test_grouped_install_counts_equal_the_per_rollout_ones(any_fleet: Fleet) -> None:  # noqa: F811
    f = any_fleet
    f.take("c0", "canary")
    f.take("c1", "canary", "gpu")
    f.take("p0", "pilot")
    f.enroll("c2", "canary")
    f.report("c2", "downloaded")  # in progress: timed out or not by the cutoff
    f.enroll("c3", "canary", "gpu")
    f.report("c3", "downloaded", "smoke_failed", reason="x")
    f.enroll("s0", "pilot")
    f.report("s0", "security", reason="signature")
    f.enroll("o0", "canary")
    f.report("o0", "downloaded", version="1.0.0")
    now = time.time()
    wants = [
        Want(1, "m", "2.0.0", "canary", now + 60),  # c2 stale
        Want(2, "m", "2.0.0", "pilot", now - 3600),  # c2 in progress
        Want(3, "m", "1.0.0", "canary", now + 60),
        Want(4, "m", "9.9.9", "canary", now),  # no rows
    ]
    with Session(f.engine) as s:
        many = count_outcomes_many(s, wants)
        for w in wants:
            one = count_outcomes(s, w.model, w.version, w.ring, w.cutoff)
            assert many[w.key] == one, w
    assert many[1].total.timed_out == 1 and many[2].total.in_progress == 1
    assert many[1].ring_confirmed == 2 and many[2].ring_confirmed == 1
    assert many[1].tiers["gpu"].failed == 1 and many[1].total.security == 1
    assert many[3].total.in_progress == 0 and many[3].total.timed_out == 1
    assert many[4].total.executed == 0


def test_extra_gates_are_judged_again_only_when_their_inputs_change(
    project: Project,  # noqa: F811
    any_fleet: Fleet,  # noqa: F811
) -> None:
    f = any_fleet
    gate = Counting()
    ctl = Controller(f.engine, project, holder="A", extra_gates=[gate], refresh_s=300)
    rid = _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    t0 = start_of_bucket()
    ctl.tick(t0)
    for i in range(3):
        f.take(f"c{i}", "canary")
    f.enroll("b0", "canary")
    f.report("b0", "downloaded", version="1.0.0")
    rep = ctl.tick(t0 + 10)
    assert len(gate.calls) == 1 and rep.verdicts[0]["action"] == "hold"
    for dt in (20, 30):  # nothing changed: reused, and the verdict repeats (no new record)
        rep = ctl.tick(t0 + dt)
        assert len(gate.calls) == 1 and not rep.verdicts and not rep.errors
    telemetry(f, "b0")  # a baseline summary: the health inputs changed
    ctl.tick(t0 + 40)
    assert gate.calls[-1] == t0 + 40 and len(gate.calls) == 2
    ctl.tick(t0 + 50)
    assert len(gate.calls) == 2
    f.enroll("late", "canary")  # an enrolment (ring, tier) changes the cohorts
    ctl.tick(t0 + 60)
    assert len(gate.calls) == 3
    ctl.tick(t0 + 359)
    assert len(gate.calls) == 3
    ctl.tick(t0 + 360)  # refresh_s after the last judgement
    assert len(gate.calls) == 4
    # the soak passes at its tick with the reused gates: the install gates and the soak are
    # judged every tick, only the (holding) extra gate is reused
    rep = ctl.tick(t0 + 601)
    assert len(gate.calls) == 4 and not rep.actions
    soak = next(g for g in rep.verdicts[0]["gates"] if g["gate"] == "soak")
    assert soak["status"] == "pass"
    assert "health.test" in rep.verdicts[0]["reason"]
    gate.status = GateStatus.PASS
    f.take("c9", "canary")  # a new confirmation: judged again, passes, promotes
    rep = ctl.tick(t0 + 602)
    assert len(gate.calls) == 5 and rep.actions and rep.actions[0]["stage"] == 1
    # a new stage is never judged on the last stage's results
    ctl.tick(t0 + 603)
    assert len(gate.calls) == 6 and gate.calls[-1] == t0 + 603
    assert signed(project).ring == "pilot" and _store.status(f.engine)[0]["id"] == rid


def test_a_deadline_is_acted_on_at_its_tick_while_the_gates_are_reused(
    project: Project,  # noqa: F811
    sqlite_fleet: Fleet,  # noqa: F811
) -> None:
    f = sqlite_fleet
    gate = Counting()
    ctl = Controller(f.engine, project, holder="A", extra_gates=[gate], refresh_s=3600)
    _store.start(f.engine, project, "m", "2.0.0", plan_from_toml(SHORT), "local:test")
    t0 = start_of_bucket()
    ctl.tick(t0)
    f.take("c0", "canary")
    for dt in (10, 60, 119):
        rep = ctl.tick(t0 + dt)
        assert not rep.actions
    assert len(gate.calls) == 1
    rep = ctl.tick(t0 + 121)  # past the 2 min deadline: paused now, not at the next change
    assert len(gate.calls) == 1
    assert rep.actions and rep.actions[0]["state"] == "paused" and signed(project).paused
    assert "deadline" in rep.verdicts[0]["reason"] and "health.test" in rep.verdicts[0]["reason"]


def test_a_gate_that_raised_is_judged_again_every_tick(
    project: Project,  # noqa: F811
    sqlite_fleet: Fleet,  # noqa: F811
) -> None:
    f = sqlite_fleet
    calls: list[float] = []

    def broken(_s: Session, ctx: RolloutContext) -> list[GateResult]:
        calls.append(ctx.now)
        raise RuntimeError("telemetry table missing")

    ctl = Controller(f.engine, project, holder="A", extra_gates=[broken])
    _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    t0 = start_of_bucket()
    ctl.tick(t0)
    for dt in (10, 20, 30):
        rep = ctl.tick(t0 + dt)
        assert not rep.actions
    assert calls == [t0 + 10, t0 + 20, t0 + 30]


def test_many_live_rollouts_in_one_tick(tmp_path: Path) -> None:
    """Three models, three live rollouts, one tick: each entered, judged and promoted on its
    own rows (the grouped reads keep them apart)."""
    from ota.fleet._models import Device, ReleaseState
    from tests.repo_helpers import make_project, publish_mlp

    proj = make_project(tmp_path)
    for m in ("a", "b", "c"):
        publish_mlp(proj, m, "1.0.0", ring="ga")
        publish_mlp(proj, m, "2.0.0", seed=1, percent=0.0)
    f = Fleet(new_db("sqlite", None, tmp_path))
    try:
        gate = Counting(GateStatus.PASS)
        ctl = Controller(f.engine, proj, holder="A", extra_gates=[gate])
        p = plan_from_toml(SHORT)
        ids = [_store.start(f.engine, proj, m, "2.0.0", p, "local:test") for m in ("a", "b", "c")]
        t0 = start_of_bucket()
        v0 = snapshot_version(proj)
        rep = ctl.tick(t0)
        assert sorted(a["rollout"] for a in rep.actions if a["signed"]) == ids
        # the three stage entries: one steering transaction, each its own audit entry, the
        # last one anchored by that commit
        assert snapshot_version(proj) == v0 + 1
        log = read_log(proj.storage)
        promotes = [e for e in log if e.event == "promote"]
        assert sorted(e.details["rollout"] for e in promotes) == ids
        assert anchored_seq(proj) == max(e.seq for e in promotes)
        assert verify_chain(log) == []
        assert all(signed_of(proj, m).ring == "canary" for m in ("a", "b", "c"))
        rep = ctl.tick(t0 + 61)  # soak passed, but no device confirmed any: all hold
        assert [v["action"] for v in rep.verdicts] == ["hold"] * 3 and len(gate.calls) == 3
        assert all("install.sample" in v["reason"] for v in rep.verdicts)
        with Session(f.engine) as s, s.begin():  # a canary device confirms b 2.0.0
            d = Device(device_id="d0", credential_hash="0" * 64, ring="canary", tier="cpu",
                       enrolled_at=t0, health="ok", events_total=0, dropped_total=0,
                       rate_window_start=0.0, rate_count=0)  # fmt: skip
            s.add(d)
            s.flush()
            s.add(ReleaseState(device_pk=d.id, model="b", version="2.0.0", state="confirmed",
                               updated_at=t0 + 61, active=True))  # fmt: skip
        rep = ctl.tick(t0 + 62)
        assert [(a["rollout"], a["stage"]) for a in rep.actions] == [(ids[1], 1)]
        assert not rep.errors and len(gate.calls) == 6  # an enrolment: all judged again
        rep = ctl.tick(t0 + 63)
        assert not rep.actions and len(gate.calls) == 7  # only b, at its new stage
    finally:
        f.engine.dispose()


def test_a_batch_that_cannot_be_signed_together_is_signed_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.repo_helpers import make_project, publish_mlp

    proj = make_project(tmp_path)
    for m in ("a", "b"):
        publish_mlp(proj, m, "2.0.0", seed=1, percent=0.0)
    f = Fleet(new_db("sqlite", None, tmp_path))
    try:
        ctl = Controller(f.engine, proj, holder="A")

        def fails(*_a: Any) -> None:
            raise RuntimeError("injected: the batch transaction fails")

        monkeypatch.setattr(ctl, "_sign_many", fails)
        p = plan_from_toml(SHORT)
        ids = [_store.start(f.engine, proj, m, "2.0.0", p, "local:test") for m in ("a", "b")]
        v0 = snapshot_version(proj)
        rep = ctl.tick(start_of_bucket())
        assert sorted(a["rollout"] for a in rep.actions if a["signed"]) == ids
        assert snapshot_version(proj) == v0 + 2 and not rep.errors
        assert all(signed_of(proj, m).ring == "canary" for m in ("a", "b"))
    finally:
        f.engine.dispose()


def test_the_live_rollouts_benchmark_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench/rollout_tick.py --live`` at a tiny size (2 models): every tick it times ran
    and every rollout was entered and promoted."""
    import json

    from bench.rollout_tick import main

    main(["--live", "1,2", "--models", "2", "--backends", "sqlite", "--repeat", "1",
          "--json", "--workdir", str(tmp_path)])  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert [(r["live"], r["promoted"]) for r in doc["results"]] == [(1, 1), (2, 2)]
    assert all(r["steady_s"] > 0 and r["fresh_s"] > 0 for r in doc["results"])
