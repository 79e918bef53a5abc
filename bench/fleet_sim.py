"""A fleet simulation against the real rollout controller (issue 9, the proof).

Per scenario, same run: a fresh repository (two releases of one model, published with the real
publisher), a fresh fleet database (SQLite or PostgreSQL) migrated to HEAD, the real fleet
service (``ota fleet serve``, gunicorn) and the real controller (:mod:`ota.rollout._controller`
with the inference-health gates of :mod:`ota.rollout._plugins`) ticking every ``tick_s`` on the
real clock (the ingest stamps reports with the service's clock, so simulated time cannot be
accelerated: soaks are real and short).

Simulated devices are enrolled through ``POST /v1/enroll``. Once per step the simulator reads
the repository's signed rollout state (the model's index, through a signed transaction) and
each device decides with the client's own policy (:func:`ota.client._policy.rank`: ring,
percentage bucket, pause, yank, failed releases); a device whose release is yanked reverts.
Outcomes and telemetry are drawn from the scenario; events go into each device's real event
queue (:class:`ota.client._events.EventQueue`) and are sent by the client's own reporter
(:func:`ota.client._report.flush_events`), telemetry summaries built with the client's own
latency buckets and :class:`~ota.client._telemetry_format.OutputCounter` and checked with
:func:`~ota.client._telemetry_format.validate_summary`.

Measured per scenario: the stage the release was halted at (or GA), the number of devices that
ever ran the release, time to GA against the plan's soaks, decision latency (the last report
acknowledged before the judging tick -> the signed metadata; the tick's own duration), false
halts. ``--false-halts N`` also runs the in-process loop of ``bench/health_gates_sim.py`` (same
gate functions on real rows, no HTTP) over N good stages.

Run: ``python -m bench.fleet_sim [--devices 2000] [--scenarios good,smoke_tier,...] [--json]``.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import urllib3

GOAL_S = 5.0
MODEL, OLD, NEW = "m", "1.0.0", "2.0.0"
TIERS = ("a", "b")
RING_SHARE = (("canary", 0.15), ("pilot", 0.25), ("ga", 0.60))


@dataclass(frozen=True)
class Scenario:
    """How a release behaves and how the fleet misbehaves. ``tier`` is the affected tier."""

    name: str
    bad: bool = False
    smoke_fail: bool = False  # smoke fails on ``tier``
    p95_factor: float = 1.0  # latency multiplied on ``tier``
    drift_sigma: float = 0.0  # outputs shifted (every tier)
    crash_p: float = 0.0  # devices that crash after commit (every tier)
    tier: str = "b"
    silent: float = 0.0  # devices that stop reporting at the start
    loss: float = 0.0  # report attempts lost (events stay queued: store-and-forward)
    late: float = 0.0  # devices that report 5x less often
    forgers: int = 0  # canary devices forging ``forge`` reports
    forge: str = ""  # "failure" or "success"


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("good"),
        Scenario("smoke_tier", bad=True, smoke_fail=True),
        Scenario("p95_tier", bad=True, p95_factor=1.3),
        Scenario("drift", bad=True, drift_sigma=1.0),
        Scenario("crash", bad=True, crash_p=0.7),
        Scenario("silent", silent=0.2),
        Scenario("loss_late", loss=0.3, late=0.1),
        Scenario("forge_failure", forgers=2, forge="failure"),
        Scenario("forge_success", bad=True, smoke_fail=True, forgers=2, forge="success"),
    )
}


def plan_toml(soak_s: int, min_devices: int, health_min: int) -> str:
    """Four stages (the last is general availability); stages below 100 % of their ring keep
    a concurrent baseline in the ring."""
    stages = (("canary", 50), ("pilot", 50), ("ga", 50), ("ga", 100))
    out = [
        'on_failure = "pause"',
        f'device_timeout = "{max(4 * soak_s, 60)}s"',
        f'stage_deadline = "{12 * soak_s}s"',
    ]
    for ring, pct in stages:
        out += [
            "[[stages]]",
            f'ring = "{ring}"',
            f"percent = {pct}",
            f"min_devices = {min_devices}",
            f'soak = "{soak_s}s"',
        ]
    out += [
        "[gates.install]",
        "max_failure_rate = 0.2",
        f"min_devices = {health_min}",
        "security_min_devices = 2",
        "[gates.health]",
        f"min_devices = {health_min}",
        "min_inferences = 1000",
    ]
    return "\n".join(out) + "\n"


# -- one simulated device ---------------------------------------------------------------------


@dataclass
class SimDevice:
    """A device's identity and what it runs; ``dev`` is what the client's reporter reads."""

    id: str
    ring: str
    tier: str
    folder: Path
    running: str = OLD
    counter: int = 1
    failed: set[str] = field(default_factory=set)
    ever_ran_new: bool = False
    silent: bool = False
    late: bool = False
    forger: bool = False
    busy_until: float = 0.0
    next_report: float = 0.0
    dev: Any = None

    def open(self, url: str, credential: str) -> None:
        from ota.client._events import EventQueue

        self.folder.mkdir(parents=True, exist_ok=True)
        token = self.folder / "credential"
        token.write_text(credential)
        me = self
        self.dev = SimpleNamespace(
            cfg=SimpleNamespace(
                report_url=url,
                device_id=self.id,
                ring=self.ring,
                tier=self.tier,
                arch="x86_64",
                runtime_version="1.31.1",
                report_token_file=str(token),
                models=[MODEL],
            ),
            events=EventQueue(self.folder / "events.json"),
            sd=SimpleNamespace(
                root=self.folder,
                load_state=lambda: SimpleNamespace(
                    models={MODEL: SimpleNamespace(version=me.running, counter=me.counter)}
                ),
            ),
            mdir=lambda name: self.folder / "models" / name,
        )

    def emit(self, kind: str, version: str, **data: Any) -> None:
        self.dev.events.append(kind, MODEL, version, **data)


def summary(
    rng: np.random.Generator, version: str, end: float, latency_s: float, out_mean: float,
    crashes: int, inferences: int = 300,
) -> dict[str, Any]:  # fmt: skip
    """One ``edge-ota.telemetry/1`` summary as the device's recorder makes it (its latency
    buckets, its output counter), validated as the recorder validates it."""
    from ota.client._telemetry_format import (
        LATENCY_BUCKETS,
        LATENCY_EDGES,
        TELEMETRY_FORMAT,
        OutputCounter,
        OutputSpec,
        validate_summary,
    )

    lat = np.exp(rng.normal(np.log(latency_s), 0.25, inferences))
    hist = [0] * LATENCY_BUCKETS
    for x in lat.tolist():
        hist[bisect.bisect_right(LATENCY_EDGES, x)] += 1
    errors = int(rng.binomial(inferences, 0.002))
    out = OutputCounter(OutputSpec("y", "hist", -4.0, 4.0, 32))
    for row in rng.normal(out_mean, 1.0, (inferences - errors, 4)):
        out.add(row)
    doc = {
        "format": TELEMETRY_FORMAT, "model": MODEL, "version": version,
        "start": end - 60, "end": end, "inferences": inferences, "errors": errors,
        "crashes": crashes, "latency": {"counts": hist, "sum_s": float(lat.sum())},
        "outputs": [out.summary().to_dict()],
    }  # fmt: skip
    validate_summary(doc)
    return doc


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Clockwork:
    """What the controller thread saw: each tick's start and end, and every verdict/action."""

    ticks: list[tuple[float, float]] = field(default_factory=list)
    verdicts: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    actions: list[tuple[float, float, dict[str, Any]]] = field(default_factory=list)
    error: str = ""


def _controller_loop(ctl: Any, tick_s: float, stop: threading.Event, cw: Clockwork) -> None:
    while not stop.is_set():
        t0 = time.time()
        try:
            rep = ctl.tick()
        except Exception as e:  # a bench reports what broke, the run goes on
            cw.error = f"{type(e).__name__}: {e}"
            rep = None
        t1 = time.time()
        cw.ticks.append((t0, t1))
        if rep is not None:
            cw.verdicts += [(t1, v) for v in rep.verdicts]
            cw.actions += [(t0, t1, a) for a in rep.actions]
        stop.wait(max(0.0, tick_s - (t1 - t0)))


@contextlib.contextmanager
def _service(backend: str, work: Path) -> Iterator[Any]:
    from tests.fleet_fixtures import _start_postgres, new_db, start_service

    pg = _start_postgres() if backend == "postgresql" else None
    url = new_db(backend, pg, work)
    with start_service(url, "--max-reports-per-minute", "100000", backend=backend) as svc:
        yield svc


def run_scenario(
    sc: Scenario,
    *,
    devices: int,
    work: Path,
    backend: str = "sqlite",
    soak_s: int = 10,
    tick_s: float = 1.0,
    report_s: float = 3.0,
    health_min: int = 5,
    seed: int = 1,
    deadline_s: float = 0.0,
    real: int = 0,
) -> dict[str, Any]:
    """One scenario end to end; returns its figures (see the module docstring). ``real``:
    real devices (``ota device init``, then the real update with its TUF client, smoke test
    and reporter at each report interval) taking part in the same run, tier ``a``."""
    from ota.client._policy import Committed, DeviceFacts, rank
    from ota.client._report import flush_events
    from ota.fleet import FleetConfig
    from ota.fleet._db import make_engine
    from ota.repository._ops import model_index
    from ota.rollout import _plugins, _store
    from ota.rollout._controller import Controller
    from ota.rollout._plan import plan_from_toml
    from tests.fleet_fixtures import call
    from tests.repo_helpers import make_project, publish_mlp

    rng = np.random.default_rng(seed)
    work.mkdir(parents=True, exist_ok=True)
    project = make_project(work)
    publish_mlp(project, MODEL, OLD, seed=1, ring="ga", percent=100.0)  # everyone has it
    publish_mlp(project, MODEL, NEW, seed=2, ring="canary", percent=0.0)
    plan = plan_from_toml(plan_toml(soak_s, health_min, health_min))
    out: dict[str, Any] = {"scenario": sc.name, "bad": sc.bad, "devices": devices}
    with _service(backend, work) as svc, _served(work / "repo", real) as repo_url:
        engine = make_engine(FleetConfig(db_url=svc.db_url))
        token = svc.enroll_token(uses=devices)
        fleet: list[SimDevice] = []
        t_enrol = time.perf_counter()
        shares = np.cumsum([s for _, s in RING_SHARE])
        for i in range(devices):
            ring = RING_SHARE[int(np.searchsorted(shares, (i + 0.5) / devices))][0]
            d = SimDevice(f"sim-{i:05d}", ring, TIERS[i % 2], work / "devices" / f"{i}")
            r = call(
                "POST",
                f"{svc.url}/v1/enroll",
                {
                    "token": token,
                    "device_id": d.id,
                    "facts": {
                        "ring": ring,
                        "tier": d.tier,
                        "arch": "x86_64",
                        "runtime_version": "1.31.1",
                        "client_version": "0.1.0",
                    },
                },
            )
            if r.status != 201:
                raise RuntimeError(f"enrolment refused: {r.status} {r.doc}")
            d.open(svc.url, str(r.doc["credential"]))
            d.silent = rng.random() < sc.silent
            d.late = rng.random() < sc.late
            d.next_report = time.time() + rng.uniform(0, report_s)
            fleet.append(d)
        reals = [_real_device(work, repo_url, svc, i) for i in range(real)]
        canary = [d for d in fleet if d.ring == "canary" and not d.silent]
        for d in canary[: sc.forgers]:
            d.forger = True
        out["enrol_s"] = round(time.perf_counter() - t_enrol, 1)
        pool = urllib3.PoolManager(num_pools=4, maxsize=16, retries=False)
        executor = ThreadPoolExecutor(8)
        acks: list[float] = []  # when each acknowledged report came back

        def send(d: SimDevice) -> None:
            res = flush_events(d.dev, pool=pool)
            if res.acked:
                acks.append(time.time())  # list.append is atomic

        # a baseline before the rollout: every device reports the old release once
        now = time.time()
        for d in fleet:
            _emit_summary(d, _telemetry(rng, d, sc, now))
        list(executor.map(send, [d for d in fleet if not d.silent]))
        ctl = Controller(
            engine,
            project,
            holder="sim",
            extra_gates=_plugins.extra_gates(),
            on_verdict=_plugins.verdict_hooks(engine),
        )
        t_start = time.time()
        _store.start(engine, project, MODEL, NEW, plan, "local:fleet-sim")
        cw = Clockwork()
        stop = threading.Event()
        th = threading.Thread(target=_controller_loop, args=(ctl, tick_s, stop, cw), daemon=True)
        th.start()
        limit = deadline_s or (len(plan.stages) * soak_s * 3 + 60)
        signed_log: list[tuple[float, str, float, bool, bool]] = []
        state_key: tuple[str, float, bool, bool] | None = None
        ended = 0.0
        try:
            while time.time() - t_start < limit:
                now = time.time()
                index = model_index(project, MODEL)  # the signed state, once per step
                assert index is not None
                st = index.get(NEW)
                assert st is not None
                key = (st.ring, st.percent, st.paused, st.yanked)
                if key != state_key:
                    state_key = key
                    signed_log.append((now, st.ring, st.percent, st.paused, st.yanked))
                due: list[SimDevice] = []
                for d in fleet:
                    if d.silent:
                        continue
                    _step_device(d, sc, index, rng, now, report_s, rank, Committed, DeviceFacts)
                    if now >= d.next_report:
                        d.next_report = now + report_s * (5 if d.late else 1)
                        if rng.random() >= sc.loss:
                            due.append(d)
                list(executor.map(send, due))
                for rd in reals:
                    if now >= rd.next_report:
                        rd.next_report = now + report_s
                        _real_update(rd)
                if st.paused or st.yanked or _done(engine):
                    ended = ended or now
                    if now - ended > 2 * report_s:  # devices act on the last signed state
                        break
                time.sleep(max(0.0, 1.0 - (time.time() - now)))
            time.sleep(tick_s * 2)  # let a last verdict land
        finally:
            stop.set()
            th.join(timeout=120)
            out["state"] = _state(engine)
            executor.shutdown()
            engine.dispose()
        out["real_devices"] = {f"{rd.ring}:{rd.id}": rd.running for rd in reals}
        out.update(_figures(sc, plan, fleet, cw, signed_log, t_start, soak_s, tick_s, acks))
    return out


@contextlib.contextmanager
def _served(root: Path, real: int) -> Iterator[str]:
    """The repository over HTTP (``ota serve``'s app) when real devices take part."""
    if not real:
        yield ""
        return
    import logging

    from tests.repo_helpers import serve_dir

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with serve_dir(root) as url:
        yield url


def _real_device(work: Path, repo_url: str, svc: Any, i: int) -> SimDevice:
    """A real device: ``ota device init`` against the served repository, enrolled with the
    fleet service, tier ``a``; ``folder`` is its state directory."""
    from click.testing import CliRunner

    from ota.cli._main import _register, cli

    ring = ("canary", "pilot", "ga")[i % 3]
    d = SimDevice(f"real-{i}", ring, "a", work / "real" / str(i))
    root = work / "repo" / "metadata" / "1.root.json"
    _register()
    r = CliRunner().invoke(
        cli,
        ["device", "init", "--state-dir", str(d.folder), "--repo-url", repo_url,
         "--root", str(root), "--device-id", d.id, "--model", MODEL, "--ring", ring,
         "--hardware", "a", "--health-timeout", "0", "--fleet-url", svc.url,
         "--enroll-token", svc.enroll_token(), "--json"],
    )  # fmt: skip
    if r.exit_code != 0:
        raise RuntimeError(f"ota device init failed: {r.output[-2000:]}")
    d.running = ""
    _real_update(d)
    return d


def _real_update(d: SimDevice) -> None:
    """``ota device update`` once (real TUF client, download, smoke test, commit, report)."""
    from ota.client import update_once
    from tests.updater_world import FAST

    res = update_once(d.folder, fetch_config=FAST)
    version = next((o.version for o in res.outcomes if o.status == "updated"), None)
    if version:
        d.running = version
        d.ever_ran_new = d.ever_ran_new or version == NEW


def _emit_summary(d: SimDevice, doc: dict[str, Any]) -> None:
    """As the recorder queues a summary: a ``telemetry`` event whose data is ``{"summary"}``."""
    d.dev.events.append("telemetry", MODEL, doc["version"], summary=doc)


def _telemetry(rng: np.random.Generator, d: SimDevice, sc: Scenario, now: float) -> dict[str, Any]:
    bad_here = d.running == NEW and not d.forger
    lat = 0.02 * (sc.p95_factor if bad_here and d.tier == sc.tier else 1.0)
    mean = sc.drift_sigma if bad_here else 0.0
    crashes = int(bad_here and rng.random() < sc.crash_p)
    version = NEW if d.forger and sc.forge == "success" else d.running
    return summary(rng, version, now, lat, mean, crashes)


def _step_device(
    d: SimDevice, sc: Scenario, index: Any, rng: np.random.Generator, now: float,
    report_s: float, rank: Any, committed_cls: Any, facts_cls: Any,
) -> None:  # fmt: skip
    """One device's step: decide with the client's policy, act, queue events."""
    if d.forger:
        if now >= d.next_report:
            if sc.forge == "failure":
                d.emit("smoke_failed", NEW, reason="forged")
            else:
                d.emit("confirmed", NEW)
                _emit_summary(d, _telemetry(rng, d, sc, now))
        return
    st = index.get(d.running)
    if d.running == NEW and st is not None and st.yanked:
        d.emit("reverted", NEW, reason="yanked")
        d.running, d.counter = OLD, 1
    if now >= d.busy_until:
        facts = facts_cls(d.id, "x86_64", d.tier, d.ring, "1.31.1", "0.1.0")
        committed = committed_cls(
            counters={MODEL: d.counter},
            failed=frozenset((MODEL, v) for v in d.failed),
            versions={MODEL: d.running},
        )
        ranking = rank(index, facts, committed, d.running)
        best = ranking.candidates[0] if ranking.candidates else None
        if best is not None and best.version == NEW and d.running != NEW:
            d.busy_until = now + rng.uniform(0.5, 3.0)  # download, smoke
            d.emit("downloaded", NEW)
            d.emit("staged", NEW)
            if sc.smoke_fail and d.tier == sc.tier:
                d.emit("smoke_failed", NEW, reason="smoke test failed")
                d.failed.add(NEW)
            else:
                d.emit("smoke_passed", NEW)
                d.emit("committed", NEW)
                d.emit("confirmed", NEW)
                d.running, d.counter, d.ever_ran_new = NEW, best.counter, True
    if now >= d.next_report:
        _emit_summary(d, _telemetry(rng, d, sc, now))


def _state(engine: Any) -> str:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from ota.fleet._rollout_models import Rollout

    with Session(engine) as s:
        return str(s.scalar(select(Rollout.state).where(Rollout.version == NEW)) or "")


def _done(engine: Any) -> bool:
    return _state(engine) in ("done", "rolled_back", "aborted", "paused")


def _figures(
    sc: Scenario, plan: Any, fleet: list[SimDevice], cw: Clockwork,
    signed: list[tuple[float, str, float, bool, bool]], t0: float, soak_s: int, tick_s: float,
    acks: list[float],
) -> dict[str, Any]:  # fmt: skip
    """The run's figures from what the controller signed (its actions, timed when the signed
    transaction returned) and what the devices saw (``signed``: the state each step read)."""
    last = len(plan.stages) - 1
    entered = {0: t0}
    latencies, acting = [], []
    halted_at: float | None = None
    for t0a, t1a, a in cw.actions:
        if not a.get("signed"):
            continue
        seen = [t for t in acks if t <= t0a]  # reports the judging tick could have read
        latencies.append(t1a - max(seen) if seen else t1a - t0a)
        acting.append(t1a - t0a)
        if a.get("event") == "promote" and a.get("state") == "running":
            entered.setdefault(int(a["stage"]), t1a)
        elif a.get("event") in ("pause", "yank", "rollback") and halted_at is None:
            halted_at = t1a
    gaps = [entered[k + 1] - entered[k] for k in range(last) if k + 1 in entered]
    tick_ms = [1000 * (b - a) for a, b in cw.ticks]
    halt_verdict = next(
        (v for _, v in cw.verdicts if v.get("action") in ("pause", "rollback")), None
    )
    return {
        "max_stage": max(entered),
        "halted": halted_at is not None or halt_verdict is not None,
        "halt_reason": str((halt_verdict or {}).get("reason", ""))[:300],
        "ga_s": round(entered[last] - t0, 1) if last in entered else None,
        "ga_budget_s": round(last * (soak_s + tick_s), 1),
        "stage_overrun_s_max": round(max(g - soak_s for g in gaps), 2) if gaps else None,
        "ran_release": sum(d.ever_ran_new for d in fleet),
        "devices_saw_paused_or_yanked": any(p or y for _, _, _, p, y in signed),
        "tick_ms_median": round(float(np.median(tick_ms)), 1) if tick_ms else None,
        "acting_tick_s_max": round(max(acting), 2) if acting else None,
        "decision_latency_s_max": round(max(latencies), 2) if latencies else None,
        "controller_error": cw.error,
        "verdicts": len(cw.verdicts),
    }


def main(argv: list[str] | None = None) -> None:
    from bench._common import base_parser, emit, environment, scratch_dir, table

    parser = base_parser(__doc__ or "")
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--backend", default="sqlite", choices=("sqlite", "postgresql"))
    parser.add_argument("--soak", type=int, default=20)
    parser.add_argument("--tick", type=float, default=2.0)
    parser.add_argument("--report", type=float, default=10.0)
    parser.add_argument("--real", type=int, default=3, help="real devices in each run")
    args = parser.parse_args(argv)
    results = []
    with scratch_dir(args.workdir) as work:
        for name in args.scenarios.split(","):
            results.append(
                run_scenario(
                    SCENARIOS[name],
                    devices=args.devices,
                    work=work / name,
                    backend=args.backend,
                    soak_s=args.soak,
                    tick_s=args.tick,
                    report_s=args.report,
                    real=args.real,
                )
            )
            print(json.dumps(results[-1]), flush=True)
    doc = {"environment": environment(), "results": results}
    rows = [
        [r["scenario"], r["max_stage"], r["halted"], r["ran_release"], r["ga_s"],
         r["ga_budget_s"], r["decision_latency_s_max"]]
        for r in results
    ]  # fmt: skip
    emit(doc, table("fleet simulation", ["scenario", "stage", "halted", "ran", "GA s",
                                          "budget s", "latency s"], rows), args.json)  # fmt: skip


if __name__ == "__main__":
    main()
