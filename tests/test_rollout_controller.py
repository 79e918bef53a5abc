"""The rollout controller on real parts: a real repository (releases published and steered
with the online key, the audit log), the real fleet database on SQLite and PostgreSQL, and
device reports that are real ``edge-ota.report/1`` documents through the service's own
parser and ingest code (the same calls as ``POST /v1/devices/<id>/events``).

What is proved: gates count distinct devices per tier (only confirmed succeeds, timeouts fail,
a security refusal by enough devices halts at once, too little data holds); a rollout goes
through its stages and ends; silence holds, then pauses at the deadline; failures roll back
with a signed yank; two controllers → one acts; a controller killed between signing and
recording resumes without signing twice; bad starts and requests are refused and change nothing.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ota.bundle import RolloutState
from ota.cli._main import _register, cli
from ota.client._policy import bucket
from ota.errors import ConflictError, ExitCode, InputError, OtaError
from ota.fleet import FleetConfig
from ota.fleet._db import make_engine
from ota.fleet._ingest import enroll, ingest, lock_device, reporter_of
from ota.fleet._local import create_enroll_token
from ota.fleet._report import parse_facts, parse_report
from ota.fleet._rollout_models import Rollout, RolloutVerdict
from ota.repository import Project, yank
from ota.repository._auditlog import read_log, verify_chain
from ota.repository._ops import model_index
from ota.rollout import _lease, _store
from ota.rollout._context import RolloutContext
from ota.rollout._controller import Controller, LostLease, settle
from ota.rollout._gates import count_outcomes, install_gates
from ota.rollout._metrics import registry
from ota.rollout._plan import Plan, plan_from_toml
from ota.rollout._verdict import GateResult, GateStatus
from tests.fleet_fixtures import fleet_backend, new_db, postgres  # noqa: F401
from tests.repo_helpers import make_project, publish_mlp
from tests.test_updater import base  # noqa: F401 - the shared published world

PLAN = """
on_failure = "{on_failure}"
device_timeout = "1h"
[[stages]]
ring = "canary"
percent = 100
min_devices = 2
soak = "10m"
deadline = "1h"
[[stages]]
ring = "pilot"
percent = 50
min_devices = 1
soak = "10m"
[[stages]]
ring = "ga"
percent = 100
min_devices = 1
soak = 0
[gates.install]
max_failure_rate = 0.2
min_devices = 3
"""


def plan(on_failure: str = "pause") -> Plan:
    return plan_from_toml(PLAN.format(on_failure=on_failure))


class Fleet:
    """Devices that enrol and report through the service's own parser and ingest code."""

    def __init__(self, url: str) -> None:
        self.cfg = FleetConfig(db_url=url)
        self.engine = make_engine(self.cfg)
        self.token = create_enroll_token(self.cfg, "t", 100_000, 86_400, "", "")["token"]
        self.seq: dict[str, itertools.count[int]] = {}
        self.facts: dict[str, tuple[str, str]] = {}

    def enroll(self, device: str, ring: str, tier: str = "cpu") -> None:
        facts = parse_facts(
            {
                "ring": ring,
                "tier": tier,
                "arch": "x86_64",
                "runtime_version": "1.31.1",
                "client_version": "0.1.0",
            }
        )
        with Session(self.engine) as s, s.begin():
            enroll(s, self.token, device, facts, time.time())
        self.seq[device] = itertools.count(1)
        self.facts[device] = (ring, tier)

    def report(self, device: str, *kinds: str, version: str = "2.0.0", **data: Any) -> None:
        ring, tier = self.facts[device]
        events = [
            {
                "seq": next(self.seq[device]),
                "time": time.time(),
                "kind": k,
                "model": "m",
                "version": version,
                "data": data,
            }
            for k in kinds
        ]
        running = version if kinds and kinds[-1] == "confirmed" else "1.0.0"
        doc = {
            "format": "edge-ota.report/1",
            "device": {
                "id": device,
                "ring": ring,
                "tier": tier,
                "arch": "x86_64",
                "runtime_version": "1.31.1",
                "client_version": "0.1.0",
                "models": {"m": {"version": running, "counter": 2}},
            },
            "queue": "q1",
            "dropped": 0,
            "events": events,
        }
        rep = parse_report(json.loads(json.dumps(doc)), device, self.cfg)
        with Session(self.engine) as s, s.begin():
            dev = lock_device(s, device)
            assert dev is not None
            ingest(s, reporter_of(s, dev), rep, time.time())

    def take(self, device: str, ring: str, tier: str = "cpu") -> None:
        """Enrol, then install and confirm 2.0.0 (the whole happy path, one report)."""
        self.enroll(device, ring, tier)
        self.report(device, "downloaded", "staged", "smoke_passed", "committed", "confirmed")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with m 1.0.0 (ga), m 2.0.0 (canary 10 %) and a yanked 0.9.0, copied per
    test."""
    root = tmp_path_factory.mktemp("published")
    project = make_project(root)
    publish_mlp(project, "m", "1.0.0", ring="ga")
    publish_mlp(project, "m", "2.0.0", seed=1, percent=10.0)
    publish_mlp(project, "m", "0.9.0-yanked", seed=2, allow_lower_version=True)
    yank(project, "m", "0.9.0-yanked")
    return root


@pytest.fixture
def project(published: Path, tmp_path: Path) -> Project:
    import shutil

    shutil.copytree(published, tmp_path / "w")
    conf = tmp_path / "w" / "proj" / "ota.toml"  # its own copy of the storage, not the shared one
    conf.write_text(conf.read_text().replace(str(published / "repo"), str(tmp_path / "w" / "repo")))
    return Project.open(tmp_path / "w" / "proj")


@pytest.fixture
def sqlite_fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(new_db("sqlite", None, tmp_path))
    yield f
    f.engine.dispose()


@pytest.fixture
def any_fleet(fleet_backend: str) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(fleet_backend)
    yield f
    f.engine.dispose()


def signed(project: Project, version: str = "2.0.0") -> RolloutState:
    index = model_index(project, "m")
    assert index is not None
    state = index.get(version)
    assert state is not None
    return state


def steering(project: Project, version: str = "2.0.0") -> list[tuple[str, dict[str, Any]]]:
    return [
        (e.event, dict(e.details))
        for e in read_log(project.storage)
        if e.subject == f"m {version}" and e.event in ("promote", "pause", "resume", "yank")
    ]


def row(engine: Engine, rid: int) -> Rollout:
    with Session(engine, expire_on_commit=False) as s:
        r = s.get(Rollout, rid)
        assert r is not None
        return r


def in_bucket(prefix: str, percent: float, n: int) -> list[str]:
    """``n`` device ids that the client's policy admits at ``percent`` for m 2.0.0."""
    out = [f"{prefix}-{i}" for i in range(500) if bucket(f"{prefix}-{i}", "m", "2.0.0") < percent]
    return out[:n]


# -- the gates on real rows ---------------------------------------------------------------------


def test_gates_count_distinct_devices_per_tier(any_fleet: Fleet) -> None:
    f = any_fleet
    for i in range(3):
        f.take(f"c{i}", "canary", "cpu")
        f.report(f"c{i}", "confirmed")  # a repeat: still one device
    f.enroll("g0", "canary", "gpu")
    f.report("g0", "downloaded", "staged", "smoke_failed", reason="slow")
    f.enroll("g1", "canary", "gpu")
    f.report("g1", "downloaded", "committed")  # committed is not success
    f.enroll("g2", "canary", "gpu")
    f.report("g2", "committed", "reverted", reason="health")
    f.enroll("p0", "pilot", "cpu")
    f.report("p0", "downloaded")
    now = time.time()
    with Session(f.engine) as s:
        out = count_outcomes(s, "m", "2.0.0", "canary", cutoff=now - 3600)
        assert out.tiers["cpu"].confirmed == 3 and out.tiers["cpu"].in_progress == 1
        gpu = out.tiers["gpu"]
        assert (gpu.confirmed, gpu.failed, gpu.in_progress, gpu.timed_out) == (0, 2, 1, 0)
        assert out.ring_confirmed == 3
        # an hour later the two in-progress devices are timed out: failures
        later = count_outcomes(s, "m", "2.0.0", "canary", cutoff=now + 10)
        assert later.tiers["gpu"].timed_out == 1 and later.tiers["gpu"].executed == 3
        p = plan()
        ctx = RolloutContext(1, "m", "2.0.0", "1.0.0", 0, "canary", 100.0, now - 3600, now)
        res = {(g.gate, g.tier): g for g in install_gates(s, ctx, p, p.stages[0])}
        assert res[("install.failures", "gpu")].status is GateStatus.HOLD  # 2 of 2: < min 3
        assert res[("install.failures", "cpu")].status is GateStatus.PASS
        assert res[("install.sample", "")].status is GateStatus.PASS  # 3 confirmed >= 2
        assert res[("install.security", "")].status is GateStatus.PASS
        ctx2 = RolloutContext(1, "m", "2.0.0", "1.0.0", 0, "canary", 100.0, now - 3600, now + 3700)
        res2 = {(g.gate, g.tier): g for g in install_gates(s, ctx2, p, p.stages[0])}
        gpu_gate = res2[("install.failures", "gpu")]
        assert gpu_gate.status is GateStatus.FAIL and gpu_gate.value == 1.0
        assert gpu_gate.evidence["timed_out"] == 1 and gpu_gate.evidence["failed"] == 2
    f.enroll("s0", "canary", "cpu")
    f.report("s0", "security", reason="bad signature")
    with Session(f.engine) as s:
        res3 = {(g.gate, g.tier): g for g in install_gates(s, ctx, p, p.stages[0])}
        assert res3[("install.security", "")].status is GateStatus.HOLD  # one alone: held
    f.enroll("s1", "pilot", "gpu")
    f.report("s1", "downloaded", "security", reason="bad signature")
    with Session(f.engine) as s:
        res4 = {(g.gate, g.tier): g for g in install_gates(s, ctx, p, p.stages[0])}
        assert res4[("install.security", "")].status is GateStatus.FAIL  # two: at once


# -- driving a rollout ----------------------------------------------------------------------


def test_a_rollout_goes_through_its_stages_and_ends(project: Project, any_fleet: Fleet) -> None:
    f = any_fleet
    seen: list[dict[str, Any]] = []
    ctl = Controller(f.engine, project, holder="A", on_verdict=[seen.append])
    rid = _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    assert row(f.engine, rid).baseline_version == "1.0.0"  # the yanked 0.9.0 is not a baseline
    t0 = time.time()
    rep = ctl.tick(t0)
    assert rep.leader and rep.actions[0]["signed"] and rep.actions[0]["stage"] == 0
    s = signed(project)
    assert (s.ring, s.percent, s.paused) == ("canary", 100.0, False)

    rep = ctl.tick(t0 + 1)  # silence: hold, never promote
    assert [v["action"] for v in rep.verdicts] == ["hold"] and not rep.actions
    for i in range(2):
        f.take(f"can-{i}", "canary")
    rep = ctl.tick(t0 + 2)  # enough devices, soak not over: still hold (same gates? no: new)
    assert not rep.actions and row(f.engine, rid).stage == 0
    rep = ctl.tick(t0 + 601)
    assert rep.actions and rep.actions[0]["stage"] == 1
    assert (signed(project).ring, signed(project).percent) == ("pilot", 50.0)

    for d in in_bucket("pil", 50.0, 1):
        f.take(d, "pilot")
    rep = ctl.tick(t0 + 601 + 601)
    assert rep.actions[0]["stage"] == 2 and signed(project).ring == "ga"
    f.take("ga-0", "ga")
    rep = ctl.tick(t0 + 601 + 602)
    r = row(f.engine, rid)
    assert (r.state, r.live_model, r.pending) == ("done", None, None)
    # three signed steering changes, each naming the rollout; every verdict in the audit log
    events = steering(project)
    assert [e for e, _ in events] == ["promote", "promote", "promote"]
    assert all(d["rollout"] == rid for _, d in events)
    verdicts = [e for e in read_log(project.storage) if e.event == "rollout-verdict"]
    assert {e.details["action"] for e in verdicts} >= {"hold", "promote"}
    assert verdicts[-1].details["reason"] == "every stage passed"  # the end is logged too
    assert verify_chain(read_log(project.storage)) == []  # every entry chains
    assert any(v["action"] == "promote" and v["acts"] for v in seen)
    with Session(f.engine) as s2:
        acted = s2.execute(select(RolloutVerdict).where(RolloutVerdict.acted)).scalars().all()
        assert len(acted) == 3  # promote x2 + done
    assert ctl.tick(t0 + 2000).actions == []  # nothing left to do


def test_silence_holds_then_pauses_at_the_deadline(project: Project, sqlite_fleet: Fleet) -> None:
    f = sqlite_fleet
    ctl = Controller(f.engine, project, holder="A")
    rid = _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    t0 = time.time()
    ctl.tick(t0)
    f.take("can-0", "canary")  # one confirmed of the two needed
    for dt in (700, 1800, 3500):
        rep = ctl.tick(t0 + dt)
        assert not rep.actions
    with Session(f.engine) as s:
        vs = s.execute(select(RolloutVerdict).where(RolloutVerdict.rollout_id == rid)).scalars()
        holds = [v for v in vs if v.action == "hold"]
        assert len(holds) == 1 and holds[0].repeats >= 2  # one record per change, not per tick
    rep = ctl.tick(t0 + 3601 + 1)
    assert rep.actions and rep.actions[0]["state"] == "paused"
    r = row(f.engine, rid)
    assert "deadline" in r.reason and "install.sample" in r.reason and "1 confirmed" in r.reason
    assert signed(project).paused and not signed(project).yanked
    assert [e for e, _ in steering(project)] == ["promote", "pause"]
    # an operator resumes: the stage clock restarts
    _store.request(f.engine, project, "m", "resume", "local:test")
    rep = ctl.tick(t0 + 4000)
    assert rep.actions[0]["state"] == "running" and not signed(project).paused
    assert row(f.engine, rid).stage_started_at == t0 + 4000


def test_failures_roll_back_with_a_signed_yank(project: Project, sqlite_fleet: Fleet) -> None:
    f = sqlite_fleet
    ctl = Controller(f.engine, project, holder="A")
    rid = _store.start(f.engine, project, "m", "2.0.0", plan("rollback"), "local:test")
    t0 = time.time()
    ctl.tick(t0)
    f.take("c-ok", "canary", "cpu")
    for i in range(2):  # fewer forged failures than the minimum sample: hold, no halt
        f.enroll(f"g{i}", "canary", "gpu")
        f.report(f"g{i}", "downloaded", "smoke_failed", reason="slow")
    rep = ctl.tick(t0 + 700)
    assert not rep.actions and rep.verdicts[0]["action"] == "hold"
    f.enroll("g2", "canary", "gpu")
    f.report("g2", "committed", "reverted", reason="health window")
    rep = ctl.tick(t0 + 701)
    assert rep.verdicts[0]["action"] == "rollback" and rep.actions[0]["state"] == "rolled_back"
    assert signed(project).yanked
    r = row(f.engine, rid)
    assert r.live_model is None and "install.failures[gpu]" in r.reason
    yanks = [d for e, d in steering(project) if e == "yank"]
    assert len(yanks) == 1 and yanks[0]["rollout"] == rid and yanks[0]["verdict_seq"]
    # the verdict with its evidence precedes the yank in the audit log
    log = read_log(project.storage)
    v = next(e for e in log if e.event == "rollout-verdict" and e.details["action"] == "rollback")
    assert v.seq == yanks[0]["verdict_seq"]
    gpu = next(g for g in v.details["gates"] if g["tier"] == "gpu")
    assert gpu["evidence"]["failed"] == 3 and gpu["value"] == "1.0"


def test_security_refusal_halts_at_once_and_extra_gates_plug_in(
    project: Project, sqlite_fleet: Fleet
) -> None:
    f = sqlite_fleet
    calls: list[RolloutContext] = []

    def health(_s: Session, ctx: RolloutContext) -> list[GateResult]:
        calls.append(ctx)
        return [GateResult("health.latency_p95", GateStatus.PASS, "ok", value=1.0, tier="cpu")]

    def broken(_s: Session, _ctx: RolloutContext) -> list[GateResult]:
        raise RuntimeError("telemetry table missing")

    ctl = Controller(f.engine, project, holder="A", extra_gates=[health, broken])
    _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    t0 = time.time()
    ctl.tick(t0)
    for i in range(3):
        f.take(f"c{i}", "canary")
    rep = ctl.tick(t0 + 700)  # every install gate passes, but a broken gate holds (fail closed)
    assert rep.verdicts[0]["action"] == "hold" and not rep.actions
    assert "error.broken" in rep.verdicts[0]["reason"]
    assert calls[-1].baseline_version == "1.0.0" and calls[-1].ring == "canary"
    for d in ("s0", "s1"):  # two devices agree (security_min_devices): halted at once
        f.enroll(d, "canary")
        f.report(d, "security", reason="signature does not verify")
    rep = ctl.tick(t0 + 701)
    assert rep.verdicts[0]["action"] == "pause" and signed(project).paused
    assert "install.security" in rep.verdicts[0]["reason"]
    # the gauges show the rollout's stage and its gates
    text = _scrape(f.engine)
    assert 'edge_ota_rollout_stage{model="m",version="2.0.0"} 0.0' in text
    assert 'edge_ota_rollout_state{model="m",state="paused",version="2.0.0"} 1.0' in text
    assert 'gate="install.security",model="m",tier="",version="2.0.0"} 2.0' in text


def _scrape(engine: Engine) -> str:
    from prometheus_client import generate_latest

    return bytes(generate_latest(registry(engine))).decode()


# -- one actor, crash safety ----------------------------------------------------------------


def test_two_controllers_only_one_acts(project: Project, any_fleet: Fleet) -> None:
    f = any_fleet
    a = Controller(f.engine, project, holder="A", lease_ttl=30)
    b = Controller(f.engine, project, holder="B", lease_ttl=30)
    _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    t0 = time.time()
    assert a.tick(t0).leader and not b.tick(t0 + 1).leader
    for i in range(2):
        f.take(f"can-{i}", "canary")
    # both tick at once, many times, past the soak: the stage is entered once
    results: list[bool] = []

    def spin(c: Controller) -> None:
        for k in range(6):
            rep = c.tick(t0 + 601 + k)
            results.append(bool(rep.actions))

    threads = [threading.Thread(target=spin, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(results) == 1
    assert [e for e, _ in steering(project)] == ["promote", "promote"]
    # A dies (stops renewing): after its lease lapses, B takes over and acts
    assert not b.tick(t0 + 620).leader
    assert b.tick(t0 + 601 + 5 + 31).leader


def test_a_controller_that_lost_its_lease_does_not_sign(
    project: Project, sqlite_fleet: Fleet
) -> None:
    f = sqlite_fleet
    a = Controller(f.engine, project, holder="A", lease_ttl=30)
    rid = _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    t0 = time.time()
    epoch = _lease.acquire(f.engine, "A", t0, 30)
    assert epoch is not None
    # A stalls past its lease; B takes it over before A reaches the signature
    assert _lease.acquire(f.engine, "B", t0 + 31, 30) == epoch + 1
    with pytest.raises(LostLease):
        a._carry_out(row(f.engine, rid), epoch, t0 + 32)
    assert signed(project).percent == 10.0 and steering(project) == []
    assert row(f.engine, rid).pending is not None  # left for the leader to carry out


KILL_SCRIPT = """
import os, sys
from ota.fleet import FleetConfig
from ota.fleet._db import make_engine
from ota.repository import Project
from ota.rollout._controller import Controller
engine = make_engine(FleetConfig(db_url=sys.argv[1]))
ctl = Controller(engine, Project.open(sys.argv[2]), holder="doomed", lease_ttl=5,
                 after_sign=lambda: os._exit(137))
ctl.tick(float(sys.argv[3]))
os._exit(3)  # not reached when a signature was made
"""


def test_a_controller_killed_between_signing_and_recording_resumes_without_acting_twice(
    project: Project, sqlite_fleet: Fleet
) -> None:
    f = sqlite_fleet
    ctl = Controller(f.engine, project, holder="A", lease_ttl=5)
    rid = _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    t0 = time.time()
    ctl.tick(t0)
    _lease.release(f.engine, "A")
    for i in range(2):
        f.take(f"can-{i}", "canary")
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, f.cfg.db_url, str(project.root_dir), str(t0 + 601)],
        check=False,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    # signed, not recorded: the metadata is valid and says pilot; the row still has the intent
    assert (signed(project).ring, signed(project).percent) == ("pilot", 50.0)
    r = row(f.engine, rid)
    assert r.stage == 0 and r.pending is not None and r.pending["stage_after"] == 1
    # a new controller (after the dead one's lease lapses) finishes it without signing again
    rep = ctl.tick(t0 + 601 + 6)
    assert rep.leader and rep.actions == [
        {"rollout": rid, "event": "promote", "signed": False, "stage": 1, "state": "running"}
    ]
    assert [e for e, _ in steering(project)] == ["promote", "promote"]
    r = row(f.engine, rid)
    assert (r.stage, r.pending, r.state) == (1, None, "running")
    verdicts = [
        e
        for e in read_log(project.storage)
        if e.event == "rollout-verdict" and e.details["action"] == "promote"
    ]
    assert len(verdicts) == 1  # recorded once, before the signature
    assert not ctl.tick(t0 + 700).actions


# -- operators ----------------------------------------------------------------------------


def _cli(project: Project, db: str, *args: str) -> tuple[int, Any]:
    _register()
    r = CliRunner().invoke(cli, [*args, "--project", str(project.root_dir), "--db", db, "--json"])
    try:
        return r.exit_code, json.loads(r.stdout)
    except ValueError:
        return r.exit_code, r.output


def test_bad_starts_and_requests_are_refused_and_change_nothing(
    project: Project, sqlite_fleet: Fleet
) -> None:
    f = sqlite_fleet
    db = f.cfg.db_url
    before = signed(project)
    code, doc = _cli(project, db, "rollout", "start", "m", "9.9.9")
    assert code == ExitCode.INPUT and "not a live release" in doc["message"]
    code, doc = _cli(project, db, "rollout", "start", "nosuch", "1.0.0")
    assert code == ExitCode.INPUT
    code, doc = _cli(project, db, "rollout", "start", "m", "0.9.0-yanked")
    assert code == ExitCode.INPUT and "yanked" in doc["message"]
    code, doc = _cli(project, db, "rollout", "pause", "m")
    assert code == ExitCode.INPUT and "no live rollout" in doc["message"]
    assert _store.status(f.engine, all_=True) == [] and signed(project) == before
    # no controller holds the lease: the command carries out the first stage itself
    code, doc = _cli(project, db, "rollout", "start", "m", "2.0.0")
    assert code == 0 and doc["actions"][0]["signed"], doc
    code, doc = _cli(project, db, "rollout", "start", "m", "2.0.0")
    assert code == ExitCode.CONFLICT and "live rollout" in doc["message"]
    with pytest.raises(ConflictError):
        _store.start(f.engine, project, "m", "2.0.0", plan(), "x")
    code, doc = _cli(project, db, "rollout", "promote", "m", "--now")
    assert code == ExitCode.USAGE  # --reason is required
    with pytest.raises(InputError, match="not paused"):
        _store.request(f.engine, project, "m", "resume", "x")
    # while another controller holds the lease, a request is queued, not carried out
    assert _lease.acquire(f.engine, "other", time.time(), 30) is not None
    code, doc = _cli(project, db, "rollout", "pause", "m", "--reason", "looks odd")
    assert code == 0 and doc["actions"] == []
    code, doc = _cli(project, db, "rollout", "abort", "m", "--reason", "x")
    assert code == ExitCode.CONFLICT  # one request at a time
    _lease.release(f.engine, "other")
    rid = _store.status(f.engine)[0]["id"]
    assert settle(Controller(f.engine, project), rid)[0]["state"] == "paused"
    assert signed(project).paused
    code, doc = _cli(project, db, "rollout", "resume", "m")
    assert code == 0 and not signed(project).paused
    code, doc = _cli(project, db, "rollout", "promote", "m", "--now", "--reason", "hotfix")
    assert code == 0 and signed(project).ring == "pilot"
    code, doc = _cli(project, db, "rollout", "status", "m", "--verdicts", "3")
    r = doc["rollouts"][0]
    assert (r["stage"], r["state"], r["ring"]) == (1, "running", "pilot")
    assert "hotfix" in r["verdicts"][0]["reason"]
    text = CliRunner().invoke(cli, ["rollout", "status", "--db", db, "--verdicts", "2"]).output
    assert "m 2.0.0 running stage 2/6 pilot 10%" in text and "hotfix" in text, text
    code, doc = _cli(project, db, "rollout", "approve", "m")
    assert code == 0 and doc["approved_stage"] == 2
    code, doc = _cli(project, db, "rollout", "abort", "m", "--reason", "enough")
    assert code == 0 and signed(project).paused
    assert _store.status(f.engine) == []  # nothing live; a new rollout may start
    log = [e.event for e in read_log(project.storage)]
    assert log.count("rollout-operator") == 5 and "rollout-start" in log


def test_dry_run_shows_devices_reached_and_timeline(project: Project, sqlite_fleet: Fleet) -> None:
    f = sqlite_fleet
    for i in range(3):
        f.enroll(f"c{i}", "canary")
    pilots = [f"p-{i}" for i in range(20)]
    for d in pilots:
        f.enroll(d, "pilot")
    f.enroll("g0", "ga")
    plan_file = project.root_dir / "plan.toml"
    plan_file.write_text(PLAN.format(on_failure="pause"))
    code, doc = _cli(
        project,
        f.cfg.db_url,
        "rollout",
        "start",
        "m",
        "2.0.0",
        "--dry-run",
        "--plan",
        str(plan_file),
    )
    assert code == 0, doc
    in_half = sum(1 for d in pilots if bucket(d, "m", "2.0.0") < 50)
    assert [s["devices"] for s in doc["stages"]] == [3, 3 + in_half, 24]
    at = [s["earliest_at"] for s in doc["stages"]]
    assert at[1] - at[0] == 600 and doc["baseline_version"] == "1.0.0"
    assert _store.status(f.engine, all_=True) == []  # a dry run starts nothing
    code, doc = _cli(project, f.cfg.db_url, "rollout", "controller", "--once")
    assert code == 0 and doc["leader"] and doc["actions"] == [] and doc["errors"] == []


# -- real devices, the real service ---------------------------------------------------------


def _device_init(w: Any, svc: Any, state: Path, device_id: str, ring: str) -> None:
    root = w.tmp / "root.json"
    root.write_bytes(w.base.trusted_root)
    _register()
    r = CliRunner().invoke(
        cli,
        [
            "device",
            "init",
            "--state-dir",
            str(state),
            "--repo-url",
            w.fs.url,
            "--root",
            str(root),
            "--device-id",
            device_id,
            "--model",
            "det",
            "--ring",
            ring,
            "--health-timeout",
            "0",
            "--fleet-url",
            svc.url,
            "--enroll-token",
            svc.enroll_token(),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output


def test_real_devices_drive_a_rollout_through_the_real_service(
    base: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Real devices (real update, smoke, reporter) report to the real service (gunicorn); the
    controller promotes on their confirmed installs, and the next ring's device follows."""
    from ota.client import update_once
    from tests import http_faults
    from tests.fleet_fixtures import start_service
    from tests.updater_world import FAST, World, current_version

    plan_2 = plan_from_toml(
        '[[stages]]\nring = "canary"\npercent = 100\nmin_devices = 2\nsoak = 0\n'
        '[[stages]]\nring = "ga"\npercent = 100\nmin_devices = 1\nsoak = 0\n'
    )
    db = new_db("sqlite", None, tmp_path)
    with http_faults.serve(tmp_path / "repo") as fs, start_service(db) as svc:
        w = World(tmp_path, base, fs)
        w.use("v1")
        project = w.project()
        publish_mlp(project, "det", "1.2.0", seed=2, percent=10.0)
        devices = {"dev-a": "canary", "dev-b": "canary", "dev-g": "ga"}
        for d, ring in devices.items():
            _device_init(w, svc, tmp_path / d, d, ring)
        engine = make_engine(FleetConfig(db_url=db))
        try:
            ctl = Controller(engine, project, holder="A")
            rid = _store.start(engine, project, "det", "1.2.0", plan_2, "local:test")
            assert ctl.tick().actions[0]["signed"]  # canary at 100 %
            for d in ("dev-a", "dev-b"):
                res = update_once(tmp_path / d, fetch_config=FAST)
                assert res.status == "updated", res.to_dict()
                assert res.report is not None and res.report.status == "sent"
            res = update_once(tmp_path / "dev-g", fetch_config=FAST)
            assert res.status != "updated" and current_version(tmp_path / "dev-g") is None
            rep = ctl.tick()
            assert rep.actions and rep.actions[0]["stage"] == 1, rep
            res = update_once(tmp_path / "dev-g", fetch_config=FAST)
            assert res.status == "updated", res.to_dict()
            assert current_version(tmp_path / "dev-g") == "1.2.0"
            ctl.tick()
            assert row(engine, rid).state == "done"
        finally:
            engine.dispose()


def test_the_service_can_run_the_controller(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ota fleet serve --rollout-controller``: a started rollout is acted on by the
    service's own controller (no command settles it), and a verdict is recorded."""
    from tests.fleet_fixtures import start_service

    monkeypatch.setenv("OTA_ROLLOUT_INTERVAL", "0.5")
    db = new_db("sqlite", None, tmp_path)
    with start_service(
        db, "--rollout-controller", "--project", str(project.root_dir), workers=1
    ) as svc:
        engine = make_engine(FleetConfig(db_url=db))
        try:
            rid = _store.start(engine, project, "m", "2.0.0", plan(), "local:test")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                r = row(engine, rid)
                with Session(engine) as s:
                    held = s.execute(
                        select(RolloutVerdict).where(RolloutVerdict.rollout_id == rid)
                    ).first()
                if r.stage == 0 and held is not None:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"the service's controller did not act:\n{svc.log_text()}")
            assert signed(project).percent == 100.0 and r.pending is None
        finally:
            engine.dispose()


def test_the_rollout_benchmark_runs(tmp_path: Path) -> None:
    """``bench/rollout_tick.py`` at a small size: it promotes, and its figures are sane."""
    from bench.rollout_tick import measure

    r = measure(300, 1, tmp_path)
    assert r["devices"] == 300 and r["goal_met"]
    assert r["gates_ms"] > 0 and r["summary_ms"] > 0 and r["tick_ms"] > 0


def test_a_start_that_cannot_be_audited_starts_nothing(
    project: Project, sqlite_fleet: Fleet
) -> None:
    import shutil

    log_dir = project.root_dir.parent / "repo" / "audit" / "log"  # the copy's storage
    shutil.rmtree(log_dir)
    log_dir.write_bytes(b"not a folder")  # every append now fails on the storage
    with pytest.raises(OtaError) as e:
        _store.start(sqlite_fleet.engine, project, "m", "2.0.0", plan(), "local:test")
    assert e.value.exit_code == ExitCode.LOCAL, e.value
    [r] = _store.status(sqlite_fleet.engine, all_=True)
    assert (r["state"], r["pending"]) == ("aborted", None) and "audit" in r["reason"]
    assert _store.status(sqlite_fleet.engine) == []  # nothing live: a new start may follow
    assert signed(project).percent == 10.0
    log_dir.unlink()
    _store.start(sqlite_fleet.engine, project, "m", "2.0.0", plan(), "local:test")
    log_dir.rename(log_dir.with_name("kept"))
    log_dir.write_bytes(b"not a folder")
    with pytest.raises(OtaError):
        _store.request(sqlite_fleet.engine, project, "m", "pause", "local:test")
    with pytest.raises(OtaError):
        _store.approve(sqlite_fleet.engine, project, "m", "local:test")
    [live] = _store.status(sqlite_fleet.engine)
    assert (live["request"], live["approved_stage"]) == (None, -1)  # both withdrawn


# -- webhooks commit with their verdict ---------------------------------------------------------

WEBHOOK_KILL_SCRIPT = """
import os, sys
from ota.fleet import FleetConfig
from ota.fleet._db import make_engine
from ota.repository import Project
from ota.rollout._controller import Controller
from ota.rollout._webhook import hooks_from_env

class KillInTransaction:  # dies inside the verdict's transaction, after the webhook enqueued
    def in_transaction(self, session, doc):
        session.flush()
        os._exit(137)
    def deliver(self):
        pass

def kill_after_commit(doc):  # dies after the commit, before the webhook's delivery
    os._exit(138)

engine = make_engine(FleetConfig(db_url=sys.argv[1]))
[webhook] = hooks_from_env(
    {"OTA_WEBHOOK_URL": "http://127.0.0.1:9/hook", "OTA_WEBHOOK_SECRET": "s" * 40}, engine
)
hooks = [webhook, KillInTransaction()] if sys.argv[4] == "in" else [kill_after_commit, webhook]
ctl = Controller(engine, Project.open(sys.argv[2]), holder="doomed-" + sys.argv[4],
                 lease_ttl=5, on_verdict=hooks)
ctl.tick(float(sys.argv[3]))
os._exit(3)  # not reached when a verdict was recorded
"""


def test_a_verdicts_webhook_commits_with_it_and_is_delivered_after_a_crash(
    project: Project, any_fleet: Fleet
) -> None:
    """A real controller process killed inside the verdict's transaction stores neither the
    verdict nor its notification; one killed right after the commit, before delivery, stores
    both; the next controller delivers the notification (signed, once)."""
    from ota.fleet._models import WebhookOutbox
    from ota.rollout._webhook import hooks_from_env
    from tests.test_rollout_webhook import SECRET, receiver

    f = any_fleet
    rid = _store.start(f.engine, project, "m", "2.0.0", plan(), "local:test")
    t0 = time.time()
    assert Controller(f.engine, project, holder="A", lease_ttl=5).tick(t0).actions  # stage 0
    _lease.release(f.engine, "A")

    def stored() -> tuple[list[RolloutVerdict], list[WebhookOutbox]]:
        with Session(f.engine) as s:
            v = list(s.scalars(select(RolloutVerdict).where(RolloutVerdict.rollout_id == rid)))
            o = list(s.scalars(select(WebhookOutbox).order_by(WebhookOutbox.id)))
            s.expunge_all()
            return v, o

    def run(when: str, at: float) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", WEBHOOK_KILL_SCRIPT, f.cfg.db_url, str(project.root_dir),
             str(at), when],
            check=False, capture_output=True, timeout=300,
        )  # fmt: skip
        return proc.returncode

    assert stored() == ([], [])
    assert run("in", t0 + 1) == 137  # killed between the outbox insert and the commit
    assert stored() == ([], [])  # neither the verdict nor its notification
    assert run("after", t0 + 1 + 6) == 138  # the dead one's lease lapsed; killed after commit
    verdicts, rows = stored()
    assert [v.action for v in verdicts] == ["hold"]
    [row_] = rows  # both: the notification was stored with the verdict
    assert row_.state == "pending" and row_.attempts == 0
    assert json.loads(row_.body)["verdict"] == verdicts[0].id
    # the next controller (after the lease lapsed) delivers it; the hold repeats, so the
    # delivery comes from the tick itself, not from a new verdict
    with receiver() as rec:
        env = {"OTA_WEBHOOK_URL": rec.url, "OTA_WEBHOOK_SECRET": SECRET}
        ctl = Controller(f.engine, project, holder="B", on_verdict=hooks_from_env(env, f.engine))
        rep = ctl.tick(t0 + 1 + 6 + 6)
        assert rep.leader and rep.verdicts == [] and rep.errors == []
        [(_, body, ok)] = rec.got
        assert ok and json.loads(body)["verdict"] == verdicts[0].id
        assert json.loads(body)["action"] == "hold"
        ctl.tick(t0 + 1 + 6 + 7)
        assert len(rec.got) == 1  # once
    _, rows = stored()
    assert [r.state for r in rows] == ["delivered"]
