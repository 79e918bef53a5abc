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

A device that installs or reverts reports at once (the real client reports at the end of each
update cycle), otherwise every ``report_s``; reports go out in the background (:class:`Sender`),
so one device's slow request never delays another's poll.

Measured per scenario: the stage the release was halted at (or GA), the number of devices that
ever ran the release, time to GA against the plan's soaks and, from every judgement's gates
(:func:`_trace_judge`), per stage when its evidence was in and what the controller added past
the later of soak end and evidence (ADR 0011's soak semantics), decision latency (the last
report acknowledged before the judging tick -> the signed metadata; the tick's own duration),
false halts.

``--many N`` (:func:`run_many`) instead runs N good releases of N models at once, each by its
own rollout, through one service and one controller, on multi-model devices with
device-to-device noise, and counts the rollouts that halted (false halts, with a binomial
confidence interval) against those that reached general availability.

Run: ``python -m bench.fleet_sim [--devices 2000] [--scenarios good,smoke_tier,...] [--json]``;
``python -m bench.fleet_sim --many 100 --devices 1200 --per-model 144 --soak 40 --report 20
[--noise moderate] [--workdir DIR]`` (``DIR/many.published`` keeps the published repository).
"""

from __future__ import annotations

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


STAGES = (("canary", 50), ("pilot", 50), ("ga", 50), ("ga", 100))


def plan_toml(
    soak_s: float, min_devices: int, health_min: int,
    stages: tuple[tuple[str, int], ...] = STAGES,
) -> str:  # fmt: skip
    """By default four stages (the last is general availability); stages below 100 % of
    their ring keep a concurrent baseline in the ring."""
    out = [
        'on_failure = "pause"',
        f'device_timeout = "{max(4 * soak_s, 60):g}s"',
        f'stage_deadline = "{max(12 * soak_s, 120):g}s"',
    ]
    for ring, pct in stages:
        out += [
            "[[stages]]",
            f'ring = "{ring}"',
            f"percent = {pct}",
            f"min_devices = {min_devices}",
            f'soak = "{soak_s:g}s"',
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
    decided: Any = None  # the inputs of the last decision (signed index, running, failed)
    next_report: float = 0.0
    flush_now: bool = False  # an update cycle just ended: report now, as ``update_once`` does
    dev: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # the queue's (see Sender)

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


def _latency_counts(lat: np.ndarray) -> list[int]:
    """The recorder's latency buckets of these latencies (``bisect_right`` on its edges)."""
    from ota.client._telemetry_format import LATENCY_BUCKETS, LATENCY_EDGES

    idx = np.searchsorted(LATENCY_EDGES, lat, side="right")
    return [int(c) for c in np.bincount(idx, minlength=LATENCY_BUCKETS)]


def _outputs(rows: np.ndarray) -> dict[str, Any]:
    """One output's summary counted by the recorder's ``OutputCounter``, one row per
    inference: rows added in batches (its bound is ``MAX_SAMPLE`` values a call), then ``n``
    set to the inferences counted, as one ``add`` per inference would leave it."""
    from ota.client._telemetry_format import MAX_SAMPLE, OutputCounter, OutputSpec

    out = OutputCounter(OutputSpec("y", "hist", -4.0, 4.0, 32))
    step = MAX_SAMPLE // max(1, rows.shape[1])
    for i in range(0, len(rows), step):
        out.add(rows[i : i + step])
    out.n = len(rows)
    d: dict[str, Any] = out.summary().to_dict()
    return d


def summary(
    rng: np.random.Generator, version: str, end: float, latency_s: float, out_mean: float,
    crashes: int, inferences: int = 300,
) -> dict[str, Any]:  # fmt: skip
    """One ``edge-ota.telemetry/1`` summary as the device's recorder makes it (its latency
    buckets, its output counter), validated as the recorder validates it."""
    from ota.client._telemetry_format import (
        TELEMETRY_FORMAT,
        validate_summary,
    )

    lat = np.exp(rng.normal(np.log(latency_s), 0.25, inferences))
    hist = _latency_counts(lat)
    errors = int(rng.binomial(inferences, 0.002))
    out = _outputs(rng.normal(out_mean, 1.0, (inferences - errors, 4)))
    doc = {
        "format": TELEMETRY_FORMAT, "model": MODEL, "version": version,
        "start": end - 60, "end": end, "inferences": inferences, "errors": errors,
        "crashes": crashes, "latency": {"counts": hist, "sum_s": float(lat.sum())},
        "outputs": [out],
    }  # fmt: skip
    validate_summary(doc)
    return doc


class Sender:
    """Reports sent by the client's reporter in the background, at most one in flight per
    device: the simulator's step (every device's poll) never waits for the service, as real
    devices do not wait for each other. A device's queue is guarded by its ``lock``: the step
    appends under it, ``flush_events`` takes it to read a batch and to acknowledge it."""

    def __init__(self, workers: int = 8) -> None:
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=16, retries=False)
        self.executor = ThreadPoolExecutor(workers)
        self.inflight: set[str] = set()
        self.acks: list[float] = []  # when each acknowledged report came back
        self.error = ""

    def submit(self, d: Any) -> None:
        if d.id not in self.inflight:  # its events wait in the queue for the next report
            self.inflight.add(d.id)
            self.executor.submit(self._send, d)

    def _send(self, d: Any) -> None:
        from ota.client._report import flush_events

        try:
            res = flush_events(d.dev, pool=self.pool, lock=lambda: d.lock)
            if res.acked:
                self.acks.append(time.time())  # list.append is atomic
        except Exception as e:  # a bench reports what broke, the run goes on
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.inflight.discard(d.id)

    def drain(self, timeout: float = 300.0) -> None:
        end = time.time() + timeout
        while self.inflight and time.time() < end:
            time.sleep(0.05)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Clockwork:
    """What the controller thread saw: each tick's start and end, and every verdict/action."""

    ticks: list[tuple[float, float]] = field(default_factory=list)
    judged: list[tuple[float, int, int, list[str]]] = field(default_factory=list)
    verdicts: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    actions: list[tuple[float, float, dict[str, Any]]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # each tick's kind: "full" or "due"
    #: per action (same order as ``actions``): its tick's start and the controller's own
    #: stopwatch of that rollout (``judged``, ``recorded``, ``signed``, ``done``)
    timings: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    error: str = ""


def _trace_judge(ctl: Any, cw: Clockwork) -> None:
    """Keep, for every judgement, when (the tick's ``now``), the rollout and stage, and the
    gates that did not pass: the evidence of what a stage waited for."""
    judge = ctl._judge

    def traced(ctx: Any, plan: Any) -> Any:
        gates = judge(ctx, plan)
        waiting = [
            f"{g.gate}{'[' + g.tier + ']' if g.tier else ''}:{g.status.value}:{g.reason}"
            for g in gates
            if g.status.value != "pass"
        ]
        cw.judged.append((ctx.now, ctx.rollout_id, ctx.stage_index, waiting))
        return gates

    ctl._judge = traced


def _controller_loop(ctl: Any, tick_s: float, stop: threading.Event, cw: Clockwork) -> None:
    """The controller's own loop (:meth:`Controller.run`: a full tick every ``tick_s``, and a
    due tick at a soak's end or when new reports arrive), every tick recorded."""

    def seen(t0: float, t1: float, rep: Any) -> None:
        cw.ticks.append((t0, t1))
        cw.kinds.append(rep.kind)
        cw.verdicts += [(t1, v) for v in rep.verdicts]
        cw.actions += [(t0, t1, a) for a in rep.actions]
        for a in rep.actions:
            cw.timings.append((t0, dict(rep.timings.get(int(a["rollout"]), {}))))

    import inspect

    if "on_tick" not in inspect.signature(ctl.run).parameters:  # the code before due ticks
        _fixed_loop(ctl, tick_s, stop, cw)  # (the same bench runs on both: before/after)
        return
    try:
        ctl.run(tick_s, stop, on_tick=seen)
    except Exception as e:  # a bench reports what broke
        cw.error = f"{type(e).__name__}: {e}"


def _fixed_loop(ctl: Any, tick_s: float, stop: threading.Event, cw: Clockwork) -> None:
    """The loop of a controller without due ticks (before/after runs of this file): its own
    ``run`` (a tick, then ``tick_s`` of waiting), each tick recorded through a wrapper."""
    tick = ctl.tick

    def recorded(*a: Any, **kw: Any) -> Any:
        t0 = time.time()
        try:
            rep = tick(*a, **kw)
        except Exception as e:  # a bench reports what broke, the run goes on
            cw.error = f"{type(e).__name__}: {e}"
            raise
        t1 = time.time()
        cw.ticks.append((t0, t1))
        cw.kinds.append("fixed")
        cw.verdicts += [(t1, v) for v in rep.verdicts]
        cw.actions += [(t0, t1, a) for a in rep.actions]
        cw.timings += [(t0, {}) for _ in rep.actions]
        return rep

    ctl.tick = recorded
    ctl.run(tick_s, stop)


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
    soak_s: float = 10,
    tick_s: float = 1.0,
    report_s: float = 3.0,
    health_min: int = 5,
    seed: int = 1,
    deadline_s: float = 0.0,
    real: int = 0,
    step_s: float = 1.0,
    stages: tuple[tuple[str, int], ...] = STAGES,
) -> dict[str, Any]:
    """One scenario end to end; returns its figures (see the module docstring). ``real``:
    real devices (``ota device init``, then the real update with its TUF client, smoke test
    and reporter at each report interval) taking part in the same run, tier ``a``."""
    from ota.client._policy import Committed, DeviceFacts, rank
    from ota.fleet import FleetConfig
    from ota.fleet._db import make_engine
    from ota.repository._ops import model_index
    from ota.rollout import _plugins, _store
    from ota.rollout._controller import Controller
    from ota.rollout._plan import plan_from_toml
    from tests.repo_helpers import make_project, publish_mlp

    rng = np.random.default_rng(seed)
    work.mkdir(parents=True, exist_ok=True)
    project = make_project(work)
    publish_mlp(project, MODEL, OLD, seed=1, ring="ga", percent=100.0)  # everyone has it
    publish_mlp(project, MODEL, NEW, seed=2, ring="canary", percent=0.0)
    plan = plan_from_toml(plan_toml(soak_s, health_min, health_min, stages))
    out: dict[str, Any] = {"scenario": sc.name, "bad": sc.bad, "devices": devices}
    with (
        _service(backend, work) as svc,
        _served(work / "repo", real) as repo_url,
        _device_dir(work) as droot,
    ):
        engine = make_engine(FleetConfig(db_url=svc.db_url))
        token = svc.enroll_token(uses=devices)
        fleet: list[SimDevice] = []
        t_enrol = time.perf_counter()
        shares = np.cumsum([s for _, s in RING_SHARE])
        for i in range(devices):
            ring = RING_SHARE[int(np.searchsorted(shares, (i + 0.5) / devices))][0]
            d = SimDevice(f"sim-{i:05d}", ring, TIERS[i % 2], droot / f"{i}")
            d.silent = rng.random() < sc.silent
            d.late = rng.random() < sc.late
            d.next_report = time.time() + rng.uniform(0, report_s)
            fleet.append(d)
        _enrol(svc, token, fleet)
        reals = [_real_device(work, repo_url, svc, i) for i in range(real)]
        canary = [d for d in fleet if d.ring == "canary" and not d.silent]
        for d in canary[: sc.forgers]:
            d.forger = True
        out["enrol_s"] = round(time.perf_counter() - t_enrol, 1)
        sender = Sender()
        acks = sender.acks

        # a baseline before the rollout: every device reports the old release once
        now = time.time()
        for d in fleet:
            _emit_summary(d, _telemetry(rng, d, sc, now))
            if not d.silent:
                sender.submit(d)
        sender.drain()
        ctl = Controller(
            engine,
            project,
            holder="sim",
            extra_gates=_plugins.extra_gates(),
            on_verdict=_plugins.verdict_hooks(engine),
        )
        cw = Clockwork()
        _trace_judge(ctl, cw)
        t_start = time.time()
        _store.start(engine, project, MODEL, NEW, plan, "local:fleet-sim")
        stop = threading.Event()
        th = threading.Thread(target=_controller_loop, args=(ctl, tick_s, stop, cw), daemon=True)
        th.start()
        limit = deadline_s or (len(plan.stages) * soak_s * 3 + 60)
        signed_log: list[tuple[float, str, float, bool, bool]] = []
        steps: list[float] = []  # the simulator's own step (devices see a state a step late)
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
                for d in fleet:
                    if d.silent:
                        continue
                    with d.lock:
                        _step_device(d, sc, index, rng, now, report_s, rank, Committed, DeviceFacts)
                    if now >= d.next_report or d.flush_now:
                        if now >= d.next_report:
                            d.next_report = now + report_s * (5 if d.late else 1)
                        d.flush_now = False  # a lost report's events wait for the next one
                        if rng.random() >= sc.loss:
                            sender.submit(d)
                steps.append(time.time() - now)
                for rd in reals:
                    if now >= rd.next_report:
                        rd.next_report = now + report_s
                        _real_update(rd)
                if st.paused or st.yanked or _done(engine):
                    ended = ended or now
                    if now - ended > 2 * report_s:  # devices act on the last signed state
                        break
                time.sleep(max(0.0, step_s - (time.time() - now)))
            time.sleep(tick_s * 2)  # let a last verdict land
        finally:
            stop.set()
            th.join(timeout=120)
            out["state"] = _state(engine)
            sender.close()
            engine.dispose()
        out["real_devices"] = {f"{rd.ring}:{rd.id}": rd.running for rd in reals}
        out.update(_figures(sc, plan, fleet, cw, signed_log, t_start, soak_s, tick_s, acks))
        out["sim_step_s_max"] = round(max(steps), 2) if steps else None
    return out


def _enrol(svc: Any, token: str, fleet: list[Any]) -> None:
    """Enrol every device through ``POST /v1/enroll`` (a few at a time) and open its queue."""
    from tests.fleet_fixtures import call

    def one(d: Any) -> None:
        facts = {"ring": d.ring, "tier": d.tier, "arch": "x86_64",
                 "runtime_version": "1.31.1", "client_version": "0.1.0"}  # fmt: skip
        r = call("POST", f"{svc.url}/v1/enroll",
                 {"token": token, "device_id": d.id, "facts": facts})  # fmt: skip
        if r.status != 201:
            raise RuntimeError(f"enrolment refused: {r.status} {r.doc}")
        d.open(svc.url, str(r.doc["credential"]))

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(one, fleet))


@contextlib.contextmanager
def _device_dir(work: Path) -> Iterator[Path]:
    """Where simulated devices keep their event queues: in memory (``/dev/shm``) when there
    is one. Every queued event is fsynced (as on a device); thousands of devices fsyncing on
    one shared disk made the simulator's own step, not the controller, the slowest part."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield work / "devices"
        return
    root = Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=shm))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
        d.flush_now = True
    sn = index.get(NEW)
    key = (sn and (sn.ring, sn.percent, sn.paused, sn.yanked), d.running, len(d.failed))
    if now >= d.busy_until and key != d.decided:  # the same inputs give the same answer
        d.decided = key
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
            d.flush_now = True  # the real client reports at the end of each update cycle
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
    signed: list[tuple[float, str, float, bool, bool]], t0: float, soak_s: float, tick_s: float,
    acks: list[float],
) -> dict[str, Any]:  # fmt: skip
    """The run's figures from what the controller signed (its actions, timed when the signed
    transaction returned) and what the devices saw (``signed``: the state each step read)."""
    last = len(plan.stages) - 1
    entered = {0: t0}  # until the controller's first action signs stage 0
    stage0_signed = False
    latencies, acting, from_due = [], [], []
    starts = {
        int(a["stage"]): t0a
        for t0a, _, a in cw.actions
        if a.get("signed") and a.get("event") == "promote" and a.get("state") == "running"
    }
    parts: dict[str, list[float]] = {"pickup": [], "judge": [], "sign": [], "commit": []}
    halted_at: float | None = None
    for (t0a, t1a, a), (_, tm) in zip(cw.actions, cw.timings, strict=True):
        if not a.get("signed"):
            continue
        seen = [t for t in acks if t <= t0a]  # reports the judging tick could have read
        latencies.append(t1a - max(seen) if seen else t1a - t0a)
        acting.append(t1a - t0a)
        # from the deciding event: the last report before the judging tick, the rollout's
        # start, and for a promotion its stage's soak end, whichever came last
        k = int(a.get("stage", 0))
        due = t0 if k == 0 or (k - 1) not in starts else starts[k - 1] + soak_s
        if a.get("event") != "promote":
            due = t0
        from_due.append(t1a - max(due, max(seen, default=due)))
        if seen and {"judged", "signed", "done"} <= tm.keys():  # where the latency went
            parts["pickup"].append(t0a - max(seen))  # last report stored -> tick starts
            parts["judge"].append(tm["judged"] - t0a)  # tick start -> its gates combined
            parts["sign"].append(tm["signed"] - tm["judged"])  # verdict, intent, signature
            parts["commit"].append(tm["done"] - tm["signed"])  # row updated, intent cleared
        if a.get("event") == "promote" and a.get("state") == "running":
            k = int(a["stage"])
            if k not in entered or (k == 0 and not stage0_signed):
                entered[k] = t1a
            stage0_signed = True
        elif a.get("event") in ("pause", "yank", "rollback") and halted_at is None:
            halted_at = t1a
    gaps = [entered[k + 1] - entered[k] for k in range(last) if k + 1 in entered]
    # per stage: its soak's end on the controller's clock (the entering tick's start + soak:
    # the row's stage_started_at) -> the next stage's entry signed (its tick's end)
    soak_to_signed = [
        round(entered[k + 1] - starts[k] - soak_s, 2)
        for k in range(last)
        if k + 1 in entered and k in starts
    ]
    data_in = _data_in(cw, entered, last)
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
        # GA signed - stage 0 signed - the soaks in between; the goal: at most one tick
        "ga_overrun_s": (
            round(entered[last] - entered[0] - last * soak_s, 2) if last in entered else None
        ),
        "stage_overrun_s_max": round(max(g - soak_s for g in gaps), 2) if gaps else None,
        "soak_end_to_signed_s": soak_to_signed,
        # per stage: stage entry (signed) -> first judgement where only the soak held
        "data_in_s": data_in,
        "stage_gap_s": [round(g, 1) for g in gaps],
        # what the controller added per stage past the later of soak end and data in: the
        # goal (ADR 0011, soak semantics) is at most one tick plus the acting tick
        "controller_overrun_s_max": (
            round(max(g - max(soak_s, d or 0.0) for g, d in zip(gaps, data_in, strict=False)), 2)
            if gaps
            else None
        ),
        "ran_release": sum(d.ever_ran_new for d in fleet),
        "devices_saw_paused_or_yanked": any(p or y for _, _, _, p, y in signed),
        "tick_ms_median": round(float(np.median(tick_ms)), 1) if tick_ms else None,
        "acting_tick_s_max": round(max(acting), 2) if acting else None,
        "decision_latency_s_max": round(max(latencies), 2) if latencies else None,
        "from_deciding_event_s_max": round(max(from_due), 2) if from_due else None,
        # the worst signed action's latency split (controller stopwatch): report stored ->
        # tick pick-up -> gates judged -> signed -> committed
        "latency_parts_s_max": {k: round(max(v), 2) for k, v in parts.items() if v},
        "ticks": {k: cw.kinds.count(k) for k in ("full", "due", "fixed") if k in cw.kinds},
        "controller_error": cw.error,
        "verdicts": len(cw.verdicts),
    }


def _data_in(cw: Clockwork, entered: dict[int, float], last: int) -> list[float | None]:
    """Per stage before GA: seconds from its signed entry to the first judgement in which no
    gate but ``soak`` held (the stage's minimum sample and health evidence were in)."""
    out: list[float | None] = []
    for k in range(last):
        ready = [
            now
            for now, _, stage, waiting in cw.judged
            if stage == k and all(w.startswith("soak:") for w in waiting)
        ]
        out.append(round(min(ready) - entered[k], 1) if ready and k in entered else None)
    return out


# -- many good rollouts at once (false halts) ---------------------------------------------


@dataclass
class Slot:
    """One model on a multi-model device: what it runs and how the device behaves with it
    (fixed per device and model, the same on either release: a good release)."""

    model: str
    running: str = OLD
    counter: int = 1
    failed: set[str] = field(default_factory=set)
    ever_ran_new: bool = False
    decided: tuple[str, float, bool, bool] | None = None  # the signed state last decided on
    latency_s: float = 0.02
    spread: float = 0.25
    error_p: float = 0.002
    inferences: int = 300
    crash_p: float = 0.02
    out_sd: float = 1.0


@dataclass
class MultiDevice:
    """A simulated device that follows several models (one event queue, one reporter)."""

    id: str
    ring: str
    tier: str
    folder: Path
    slots: dict[str, Slot] = field(default_factory=dict)
    late: bool = False
    next_report: float = 0.0
    flush_now: bool = False
    dev: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, url: str, credential: str) -> None:
        from ota.client._events import EventQueue

        self.folder.mkdir(parents=True, exist_ok=True)
        token = self.folder / "credential"
        token.write_text(credential)
        slots = self.slots
        self.dev = SimpleNamespace(
            cfg=SimpleNamespace(
                report_url=url, device_id=self.id, ring=self.ring, tier=self.tier,
                arch="x86_64", runtime_version="1.31.1", report_token_file=str(token),
                models=sorted(slots),
            ),
            events=EventQueue(self.folder / "events.json"),
            sd=SimpleNamespace(
                root=self.folder,
                load_state=lambda: SimpleNamespace(
                    models={
                        m: SimpleNamespace(version=x.running, counter=x.counter)
                        for m, x in slots.items()
                    }
                ),
            ),
            mdir=lambda name: self.folder / "models" / name,
        )  # fmt: skip


def noisy_summary(
    rng: np.random.Generator, model: str, x: Slot, tier_factor: float, end: float, interval: float
) -> dict[str, Any]:
    """A summary of one interval with device-to-device noise (as ``bench/health_gates_sim.py``
    draws it): the device's own speed and spread, error rate, traffic and output spread, a
    crash now and then; counted with the recorder's buckets and ``OutputCounter`` (values
    added in batches of whole inferences, then ``n`` = the inferences counted) and validated
    as the recorder validates it."""
    from ota.client._telemetry_format import (
        TELEMETRY_FORMAT,
        validate_summary,
    )

    n = max(20, int(rng.poisson(x.inferences)))
    lat = np.exp(rng.normal(np.log(x.latency_s * tier_factor), x.spread, n))
    errors = int(rng.binomial(n, x.error_p))
    doc = {
        "format": TELEMETRY_FORMAT, "model": model, "version": x.running,
        "start": end - interval, "end": end, "inferences": n, "errors": errors,
        "crashes": int(rng.random() < x.crash_p),
        "latency": {"counts": _latency_counts(lat), "sum_s": float(lat.sum())},
        "outputs": [_outputs(rng.normal(0.0, x.out_sd, (n - errors, 4)))],
    }  # fmt: skip
    validate_summary(doc)
    return doc


def run_many(
    *,
    models: int,
    per_model: int,
    devices: int,
    work: Path,
    backend: str = "sqlite",
    soak_s: int = 30,
    tick_s: float = 2.0,
    report_s: float = 15.0,
    health_min: int = 5,
    loss: float = 0.1,
    late: float = 0.05,
    seed: int = 1,
    deadline_s: float = 0.0,
    noise: str = "pessimistic",
) -> dict[str, Any]:
    """``models`` good releases rolled out at once, each by its own rollout (the same plan as
    the scenarios) to its own ``per_model`` devices, drawn per (ring, tier) cell from
    ``devices`` multi-model devices (rings in thirds, tiers ``a``/``b`` in halves, tier ``b``
    1.6x slower), through one service and one controller. Noise: per device and model speed,
    spread, error rate, traffic and output spread; 2 % of intervals crash on either release;
    ``loss`` of report attempts lost; ``late`` devices report 3x less often. Counts the
    rollouts that halted (false halts: every release is good) and those that reached GA.

    ``noise``: ``pessimistic`` is ``bench/health_gates_sim.py``'s device-to-device spread
    (speed log-normal sigma 0.2 within a tier, latency spread sigma 0.15-0.4: per-device
    p95s of one tier vary about 25 %); ``moderate`` halves it (speed sigma 0.1, spread
    0.2-0.3), nearer one hardware tier's devices running one model."""
    from scipy.stats import binomtest  # type: ignore[import-untyped]

    from ota.client._policy import Committed, DeviceFacts, rank
    from ota.fleet import FleetConfig
    from ota.fleet._db import make_engine
    from ota.repository._ops import model_index
    from ota.rollout import _plugins, _store
    from ota.rollout._controller import Controller
    from ota.rollout._plan import plan_from_toml
    from tests.repo_helpers import make_project, publish_mlp

    rng = np.random.default_rng(seed)
    work.mkdir(parents=True, exist_ok=True)
    names = [f"m{k:03d}" for k in range(models)]
    t_pub = time.perf_counter()
    project = _published(work, names, make_project, publish_mlp)
    plan = plan_from_toml(plan_toml(soak_s, health_min, health_min))
    speed_sd, spread = {"pessimistic": (0.2, (0.15, 0.4)), "moderate": (0.1, (0.2, 0.3))}[noise]
    rings = [r for r, _ in RING_SHARE]
    cells = [(r, t) for r in rings for t in TIERS]
    if per_model % len(cells) or devices % len(cells) or per_model > devices:
        raise ValueError("per_model and devices must be multiples of 6, per_model <= devices")
    out: dict[str, Any] = {
        "mode": "many", "rollouts": models, "devices": devices, "per_model": per_model,
        "soak_s": soak_s, "tick_s": tick_s, "report_s": report_s, "loss": loss, "late": late,
        "noise": noise,
        "publish_s": round(time.perf_counter() - t_pub, 1), "backend": backend,
    }  # fmt: skip
    with _service(backend, work) as svc, _device_dir(work) as droot:
        engine = make_engine(FleetConfig(db_url=svc.db_url))
        fleet = [
            MultiDevice(f"sim-{i:05d}", *cells[i % len(cells)], droot / str(i))
            for i in range(devices)
        ]
        by_cell = {c: [d for d in fleet if (d.ring, d.tier) == c] for c in cells}
        for m in names:  # each model: the same number of devices in every (ring, tier) cell
            for c in cells:
                pick = rng.choice(len(by_cell[c]), per_model // len(cells), replace=False)
                for j in pick.tolist():
                    by_cell[c][j].slots[m] = Slot(
                        m,
                        latency_s=0.02 * float(rng.lognormal(0, speed_sd)),
                        spread=float(rng.uniform(*spread)),
                        error_p=float(rng.uniform(0, 0.004)),
                        inferences=int(rng.integers(100, 1000)),
                        out_sd=float(rng.uniform(0.9, 1.1)),
                    )
        fleet = [d for d in fleet if d.slots]
        token = svc.enroll_token(uses=len(fleet))
        t_enrol = time.perf_counter()
        _enrol(svc, token, fleet)
        for d in fleet:
            d.late = rng.random() < late
            d.next_report = time.time() + rng.uniform(0, report_s)
        out["enrol_s"] = round(time.perf_counter() - t_enrol, 1)
        out["models_per_device_mean"] = round(float(np.mean([len(d.slots) for d in fleet])), 1)
        sender = Sender()

        def report(d: MultiDevice, now: float) -> None:
            tier_factor = 1.6 if d.tier == "b" else 1.0
            docs = [
                noisy_summary(rng, m, x, tier_factor, now, report_s) for m, x in d.slots.items()
            ]
            with d.lock:
                for doc in docs:
                    d.dev.events.append("telemetry", doc["model"], doc["version"], summary=doc)

        now = time.time()
        for d in fleet:  # the baseline before the rollouts: one interval of the old release
            report(d, now)
            sender.submit(d)
        sender.drain()
        ctl = Controller(engine, project, holder="sim", extra_gates=_plugins.extra_gates(),
                         on_verdict=_plugins.verdict_hooks(engine))  # fmt: skip
        cw = Clockwork()
        _trace_judge(ctl, cw)
        t_start = time.time()
        for m in names:
            _store.start(engine, project, m, NEW, plan, "local:fleet-sim")
        stop = threading.Event()
        th = threading.Thread(target=_controller_loop, args=(ctl, tick_s, stop, cw), daemon=True)
        th.start()
        limit = deadline_s or (len(plan.stages) * soak_s * 3 + 300)
        steps: list[float] = []
        states: dict[str, str] = {}
        try:
            while time.time() - t_start < limit:
                now = time.time()
                index = {m: model_index(project, m) for m in names}
                for d in fleet:
                    with d.lock:
                        _step_multi(d, index, now, rank, Committed, DeviceFacts)
                    if now >= d.next_report or d.flush_now:
                        if now >= d.next_report:
                            d.next_report = now + report_s * (3 if d.late else 1)
                            report(d, now)
                        d.flush_now = False
                        if rng.random() >= loss:
                            sender.submit(d)
                steps.append(time.time() - now)
                states = _states(engine)
                if all(v in ("done", "paused", "rolled_back", "aborted") for v in states.values()):
                    break
                time.sleep(max(0.0, 1.0 - (time.time() - now)))
        finally:
            stop.set()
            th.join(timeout=600)
            states = _states(engine)
            sender.close()
            engine.dispose()
    out.update(_many_figures(cw, names, states, plan, soak_s, t_start, steps))
    k, n = out["false_halts"], out["rollouts"]
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    out["false_halt_rate"] = round(k / n, 4)
    out["false_halt_ci95"] = [round(float(ci.low), 4), round(float(ci.high), 4)]
    return out


def _published(work: Path, names: list[str], make_project: Any, publish_mlp: Any) -> Any:
    """The project with both releases of every model, published with the real publisher
    (~2 s a release under load). A copy is kept beside ``work`` (``<work>.published``) and
    restored by the next run with the same models (its signed state is the one before any
    rollout; expiry permitting: the online metadata's expiry is days); the project's
    ``ota.toml`` names its storage by absolute path, rewritten when restored elsewhere."""
    import shutil

    from ota.repository import Project

    cache = work.parent / f"{work.name}.published"
    stamp = ",".join(names)
    parts = ("proj", "repo", "models")
    if (cache / "names").is_file() and (cache / "names").read_text() == stamp:
        for part in parts:
            shutil.rmtree(work / part, ignore_errors=True)
            shutil.copytree(cache / part, work / part, symlinks=True)
        conf = work / "proj" / "ota.toml"
        origin = (cache / "origin").read_text()
        conf.write_text(conf.read_text().replace(f"{origin}/repo", f"{work}/repo"))
        return Project.open(work / "proj")
    project = make_project(work)
    for m in names:
        publish_mlp(project, m, OLD, seed=1, ring="ga", percent=100.0)
        publish_mlp(project, m, NEW, seed=2, ring="canary", percent=0.0)
    shutil.rmtree(cache, ignore_errors=True)
    for part in parts:
        shutil.copytree(work / part, cache / part, symlinks=True)
    (cache / "names").write_text(stamp)
    (cache / "origin").write_text(str(work))
    return project


def _step_multi(
    d: MultiDevice, index: dict[str, Any], now: float, rank: Any, committed_cls: Any,
    facts_cls: Any,
) -> None:  # fmt: skip
    """A device's update cycle for the models whose signed state changed since it last
    decided (the same answer otherwise): decide with the client's policy, install, queue the
    events, and report at once when anything was installed (as ``update_once`` does)."""
    facts = None
    for m, x in d.slots.items():
        idx = index.get(m)
        st = idx.get(NEW) if idx is not None else None
        if idx is None or st is None:
            continue
        key = (st.ring, st.percent, st.paused, st.yanked)
        if key == x.decided:
            continue
        x.decided = key
        if x.running == NEW and st.yanked:
            d.dev.events.append("reverted", m, NEW, reason="yanked")
            x.running, x.counter, d.flush_now = OLD, 1, True
            continue
        facts = facts or facts_cls(d.id, "x86_64", d.tier, d.ring, "1.31.1", "0.1.0")
        committed = committed_cls(
            counters={m: x.counter},
            failed=frozenset((m, v) for v in x.failed),
            versions={m: x.running},
        )
        ranking = rank(idx, facts, committed, x.running)
        best = ranking.candidates[0] if ranking.candidates else None
        if best is not None and best.version == NEW and x.running != NEW:
            for kind in ("downloaded", "staged", "smoke_passed", "committed", "confirmed"):
                d.dev.events.append(kind, m, NEW)
            x.running, x.counter, x.ever_ran_new, d.flush_now = NEW, best.counter, True, True


def _states(engine: Any) -> dict[str, str]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from ota.fleet._rollout_models import Rollout

    with Session(engine) as s:
        rows = s.execute(select(Rollout.model, Rollout.state).where(Rollout.version == NEW))
        return {str(m): str(st) for m, st in rows}


def _many_figures(
    cw: Clockwork, names: list[str], states: dict[str, str], plan: Any, soak_s: float,
    t0: float, steps: list[float],
) -> dict[str, Any]:  # fmt: skip
    """Per rollout: halted (a signed pause or yank, or a pause/rollback verdict), reached GA
    (its last stage signed), and the GA time past its soaks; the halts' reasons."""
    last = len(plan.stages) - 1
    rid_model = {}
    for _, v in cw.verdicts:
        if "rollout" in v and "model" in v:
            rid_model[int(v["rollout"])] = str(v["model"])
    entered: dict[int, dict[int, float]] = {}
    halted: dict[int, str] = {}
    for _, t1a, a in cw.actions:
        rid = int(a.get("rollout", 0))
        if a.get("event") == "promote" and a.get("state") == "running":
            entered.setdefault(rid, {}).setdefault(int(a["stage"]), t1a)
        elif a.get("event") in ("pause", "yank"):
            halted.setdefault(rid, str(a.get("stage")))
    for _, v in cw.verdicts:
        if v.get("action") in ("pause", "rollback"):
            rid = int(v.get("rollout", 0))
            halted[rid] = f"stage {v.get('stage')}: {str(v.get('reason', ''))[:300]}"
    ga = {rid: e for rid, e in entered.items() if last in e}
    over = [e[last] - e[0] - last * soak_s for e in ga.values() if 0 in e]
    ticks = [b - a for a, b in cw.ticks]
    stuck = {m: st for m, st in states.items() if st not in ("done", "paused", "rolled_back")}
    return {
        "false_halts": len(halted),
        "reached_ga": len(ga),
        "done": sum(st == "done" for st in states.values()),
        "states": {
            st: sum(v == st for v in states.values()) for st in sorted(set(states.values()))
        },
        "not_finished": stuck,
        "halts": {rid_model.get(rid, str(rid)): why for rid, why in halted.items()},
        "ga_overrun_s_max": round(max(over), 1) if over else None,
        "ga_overrun_s_median": round(float(np.median(over)), 1) if over else None,
        "run_s": round(max((t for t, _ in cw.ticks), default=t0) - t0, 1),
        "tick_s_median": round(float(np.median(ticks)), 2) if ticks else None,
        "tick_s_max": round(max(ticks), 1) if ticks else None,
        "sim_step_s_max": round(max(steps), 2) if steps else None,
        "judgements": len(cw.judged),
        "controller_error": cw.error,
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
    parser.add_argument(
        "--many", type=int, default=0,
        help="instead: this many good rollouts at once (false halts), see run_many",
    )  # fmt: skip
    parser.add_argument("--per-model", type=int, default=144, help="--many: devices per model")
    parser.add_argument("--loss", type=float, default=0.1, help="--many: lost report attempts")
    parser.add_argument("--late", type=float, default=0.05, help="--many: late devices")
    parser.add_argument("--noise", default="pessimistic", choices=("pessimistic", "moderate"))
    args = parser.parse_args(argv)
    if args.many:
        with scratch_dir(args.workdir) as work:
            r = run_many(
                models=args.many, per_model=args.per_model, devices=args.devices,
                work=work / "many", backend=args.backend, soak_s=args.soak,
                tick_s=args.tick, report_s=args.report, loss=args.loss, late=args.late,
                noise=args.noise,
            )  # fmt: skip
        rows = [[r["rollouts"], r["reached_ga"], r["done"], r["false_halts"],
                 f"{r['false_halt_rate']:.1%}", r["false_halt_ci95"], r["run_s"]]]  # fmt: skip
        head = ["rollouts", "reached GA", "done", "halted", "false halts", "95% CI", "run s"]
        emit({"environment": environment(), "many": r},
             table("many good rollouts at once", head, rows), args.json)  # fmt: skip
        return
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
         r["ga_overrun_s"], r["data_in_s"], r["controller_overrun_s_max"],
         r["soak_end_to_signed_s"], r["decision_latency_s_max"], r["latency_parts_s_max"],
         r["ticks"]]
        for r in results
    ]  # fmt: skip
    head = ["scenario", "stage", "halted", "ran", "GA s", "GA - soaks s", "data in s",
            "ctl overrun s", "soak end to signed s", "latency s", "latency parts max s",
            "ticks"]  # fmt: skip
    emit(doc, table("fleet simulation", head, rows), args.json)


if __name__ == "__main__":
    main()
