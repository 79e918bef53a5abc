"""The rollout gauges on the fleet service's own ``GET /metrics`` (issue 9, ADR 0011): the
real service under gunicorn (2 workers, multiprocess mode) on SQLite and PostgreSQL, a real
rollout started and judged by the real controller on the same database; the scrape shows its
stage, percentage, state and gates, follows it as it changes, and drops it once it ends. The
collector reads in one statement however many rollouts and verdicts exist (counted)."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.orm import Session

from ota.fleet import FleetConfig
from ota.fleet._db import make_engine
from ota.fleet._rollout_models import Rollout, RolloutVerdict
from ota.repository import Project
from ota.rollout import _store
from ota.rollout._controller import Controller
from ota.rollout._metrics import RolloutCollector
from tests.fleet_fixtures import (  # noqa: F401 - fixtures used by name
    FleetService,
    fleet_backend,
    fleet_service,
    new_db,
    postgres,
)
from tests.test_fleet_metrics import scrape
from tests.test_rollout_controller import (  # noqa: F401 - fixtures used by name
    Fleet,
    plan,
    project,
    published,
)

PREFIX = "edge_ota_rollout_"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def rollout_samples(
    m: Samples, name: str, **labels: str
) -> dict[frozenset[tuple[str, str]], float]:
    want = set(labels.items())
    return {ls: v for (n, ls), v in m.items() if n == PREFIX + name and want <= ls}


def one(m: Samples, name: str, **labels: str) -> float:
    [v] = rollout_samples(m, name, **labels).values()
    return v


def test_the_service_metrics_show_each_live_rollout(
    fleet_service: FleetService,  # noqa: F811
    project: Project,  # noqa: F811
) -> None:
    svc = fleet_service
    read = svc.operator_token("read")
    before = scrape(svc, read)
    assert rollout_samples(before, "stage") == {}  # the families are there, empty
    assert one(before, "series_truncated") == 0.0
    f = Fleet(svc.db_url)
    engine = make_engine(FleetConfig(db_url=svc.db_url))
    try:
        ctl = Controller(engine, project, holder="A")
        rid = _store.start(engine, project, "m", "2.0.0", plan(), "local:test")
        t0 = time.time()
        ctl.tick(t0)  # canary 100 % signed
        ctl.tick(t0 + 1)  # no devices yet: a hold with its gates
        got = scrape(svc, read)
        ids = {"model": "m", "version": "2.0.0"}
        assert one(got, "stage", **ids) == 0.0
        assert one(got, "percent", **ids, ring="canary") == 100.0
        assert one(got, "state", **ids, state="running") == 1.0
        sample = {**ids, "gate": "install.sample", "tier": ""}
        assert one(got, "gate_status", **sample) == 1.0  # hold
        assert one(got, "gate_value", **sample) == 0.0
        assert one(got, "gate_threshold", **sample) == 2.0  # the stage's min_devices
        assert one(got, "scrape_query_seconds") >= 0.0
        # the devices confirm, the soak passes: the next stage shows at the next scrape
        for i in range(2):
            f.take(f"can-{i}", "canary")
        assert ctl.tick(t0 + 601).actions
        got = scrape(svc, read)
        assert one(got, "stage", **ids) == 1.0
        assert one(got, "percent", **ids, ring="pilot") == 50.0
        assert rollout_samples(got, "percent", ring="canary") == {}
        # an ended rollout leaves the gauges
        with Session(engine) as s, s.begin():
            r = s.get(Rollout, rid)
            assert r is not None
            r.state, r.live_model = "aborted", None
        assert rollout_samples(scrape(svc, read), "stage") == {}
    finally:
        f.engine.dispose()
        engine.dispose()


def fill(engine: object, rollouts: int, verdicts: int, gates: int) -> None:
    """``rollouts`` live rollouts (plus as many ended ones), each with ``verdicts`` verdicts of
    ``gates`` gates, written directly (the collector only reads rows)."""
    p = plan().to_dict()
    g = [
        {"gate": f"health.g{k}", "tier": "t", "status": "hold", "value": 1.0, "threshold": 2.0}
        for k in range(gates)
    ]
    with Session(engine) as s, s.begin():  # type: ignore[arg-type]
        for i in range(2 * rollouts):
            live = i < rollouts
            r = Rollout(
                model=f"m{i}", version="1.0.0", live_model=f"m{i}" if live else None,
                state="running" if live else "done", plan=p, plan_sha256="0" * 64, stage=1,
                stage_started_at=0.0, created_at=0.0, updated_at=0.0,
            )  # fmt: skip
            s.add(r)
            s.flush()
            for k in range(verdicts):
                s.add(RolloutVerdict(rollout_id=r.id, at=k, last_at=k, stage=1, action="hold",
                                     digest=str(k), gates=g))  # fmt: skip


def test_a_scrape_is_one_bounded_statement(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    db = new_db("sqlite", None, tmp_path)
    engine = make_engine(FleetConfig(db_url=db))
    statements: list[str] = []
    try:
        fill(engine, rollouts=50, verdicts=5, gates=12)
        reg = CollectorRegistry()
        reg.register(RolloutCollector(engine))

        def count(*args: object) -> None:
            statements.append(str(args[2]))

        event.listen(engine, "before_cursor_execute", count)
        text = generate_latest(reg).decode()
        event.remove(engine, "before_cursor_execute", count)
    finally:
        engine.dispose()
    selects = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1, selects  # not one per rollout
    assert "LIMIT" in selects[0].upper()
    assert text.count(f"{PREFIX}stage{{") == 50  # the live ones only
    assert text.count(f"{PREFIX}gate_status{{") == 50 * 12  # the latest verdict's gates


def test_the_scrape_benchmark_runs(tmp_path: Path) -> None:
    """``bench/rollout_scrape.py`` at a small size: one statement, the live rollouts only."""
    from bench.rollout_scrape import GATES, measure

    r = measure("sqlite", 3, 2, tmp_path)
    assert r["statements"] == 1 and r["series"] == 3 * GATES
    assert r["query_ms"] > 0 and r["rollout_ms"] > 0 and r["fleet_ms"] > 0


def test_a_gate_figure_too_large_for_a_float_does_not_break_the_scrape(tmp_path: Path) -> None:
    """A stored gate value or threshold that is an integer beyond a float's range (JSON keeps
    it exact; a gate plugin may report one) is left out of the gauges, never an
    OverflowError that turns every scrape into a 500 while the rollout lives (review1, low)."""
    from prometheus_client import CollectorRegistry, generate_latest

    db = new_db("sqlite", None, tmp_path)
    engine = make_engine(FleetConfig(db_url=db))
    try:
        fill(engine, rollouts=2, verdicts=1, gates=2)
        with Session(engine) as s, s.begin():
            v = s.query(RolloutVerdict).order_by(RolloutVerdict.id).first()
            assert v is not None
            huge = {"status": "hold", "value": 10**400, "threshold": -(10**400)}
            v.gates = [{"gate": "health.huge", "tier": "t", **huge}, *v.gates]
        reg = CollectorRegistry()
        reg.register(RolloutCollector(engine))
        text = generate_latest(reg).decode()
    finally:
        engine.dispose()
    assert text.count(f"{PREFIX}gate_status{{") == 2 * 2 + 1  # the huge gate's status stays
    assert 'gate="health.huge"' in text
    values = [ln for ln in text.splitlines() if ln.startswith(f"{PREFIX}gate_value{{")]
    thresholds = [ln for ln in text.splitlines() if ln.startswith(f"{PREFIX}gate_threshold{{")]
    assert not [ln for ln in values + thresholds if "health.huge" in ln]
    assert text.count(f"{PREFIX}gate_value{{") == 2 * 2  # the others' figures are all there
