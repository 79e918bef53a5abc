"""The rollout controller's cost as the fleet grows: the install-gate query per evaluation, and
the decision latency of a tick that promotes (judge, record, log, sign, record).

Synthetic fleets are bulk-loaded into the service's schema on SQLite (``bench.fleet_query``:
3 rings, 3 tiers, 3 models of 3 versions, one release state per device and model, 10 %
reverted), untimed. Then, same run, same database:

* ``gates_ms``: :func:`ota.rollout._gates.count_outcomes` for one release (the aggregate the
  controller runs per stage and tick), against the baseline ``summary_ms``: one full fleet
  count (``fleet/_store.summary``, what a cache refresh of ``GET /v1/fleet`` costs);
* ``tick_ms``: one controller tick that judges a stage and promotes it (gates, verdict row,
  audit entry, the signed steering transaction on a local-folder repository, the row),
  against the baseline ``promote_ms``: a plain ``ota promote`` of the same kind (one signed
  steering transaction). Goal (issue 9): decision latency <= 5 s.

``--live 1,10,100`` instead measures one controller tick against N live rollouts at once
(:func:`measure_live`): N models of one repository (two real releases each, published once
with the real publisher and copied per run), N rollouts, 1,200 multi-model devices (150 per
model; rings in thirds, tiers ``a``/``b``), their ``device_models``, ``release_states`` and
inference telemetry (``telemetry_agg``/``telemetry_bins``, two buckets per device and
release), written as the service writes them, on SQLite and PostgreSQL (``--backends``). The
controller has the inference-health gates plugged in, as ``ota rollout controller`` has. Per
N, same database: ``enter_s`` (the tick that signs every stage-0 entry), ``judge_s`` (the
first judgement of every stage), ``steady_s`` (median of ``--repeat`` ticks in which nothing
changed), ``fresh_s`` (median of ticks after one new report per rollout: every rollout's
inputs changed; with ``--profile FILE`` one more such tick runs under cProfile, untimed, its
stats dumped to ``FILE-<backend>-<N>``) and ``promote_s`` (the tick that passes every soak
and signs every promotion); the baseline is the same tick at N = 1 (ratio per rollout).

Run: ``python -m bench.rollout_tick [--json] [--sizes 1000,10000,100000] [--repeat 5]``;
``python -m bench.rollout_tick --live 1,10,100 [--backends sqlite,postgresql] [--repeat 3]
[--models 100]`` (``tests/test_rollout_tick.py`` runs it with 2 models).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench._common import base_parser, emit, environment, log, scratch_dir, table

GOAL_S = 5.0
PLAN = """
[[stages]]
ring = "canary"
percent = 100
min_devices = 1
soak = 0
[[stages]]
ring = "pilot"
percent = 100
min_devices = 1
soak = 0
[[stages]]
ring = "ga"
percent = 100
min_devices = 1
soak = 0
[gates.install]
max_failure_rate = 0.2
"""


def _median_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(times), 2)


def measure(n: int, repeat: int, work: Path) -> dict[str, Any]:
    from sqlalchemy.orm import Session

    from bench.fleet_query import load_sqlite
    from ota.fleet import FleetConfig, migrate
    from ota.fleet._db import make_engine
    from ota.fleet._store import summary
    from ota.repository import promote
    from ota.rollout import _store
    from ota.rollout._controller import Controller
    from ota.rollout._gates import count_outcomes
    from ota.rollout._plan import plan_from_toml
    from tests.repo_helpers import make_project, publish_mlp

    folder = work / f"n{n}"
    folder.mkdir()
    path = folder / "fleet.sqlite3"
    url = f"sqlite:///{path}"
    migrate(url)
    log(f"loading {n} devices")
    load_sqlite(str(path), n, 1)
    engine = make_engine(FleetConfig(db_url=url))
    now = time.time()
    with Session(engine) as s:
        gates_ms = _median_ms(lambda: count_outcomes(s, "det", "1.2.0", "pilot", now), repeat)
        summary_ms = _median_ms(lambda: summary(s, now, 86400.0), repeat)
    project = make_project(folder)
    for i, v in enumerate(("1.0.0", "1.1.0", "1.2.0")):
        publish_mlp(project, "det", v, seed=i)
    ctl = Controller(engine, project, holder="bench")
    _store.start(engine, project, "det", "1.2.0", plan_from_toml(PLAN), "bench")
    ctl.tick()  # enters stage 0
    t0 = time.perf_counter()
    rep = ctl.tick()  # judges stage 0 on the loaded devices and promotes to stage 1
    tick_ms = round(1000 * (time.perf_counter() - t0), 2)
    if not (rep.actions and rep.actions[0].get("signed")):
        raise RuntimeError(f"the tick did not promote: {rep}")
    promote_ms = _median_ms(lambda: promote(project, "det", "1.1.0", "pilot", 50.0), repeat)
    engine.dispose()
    return {
        "devices": n,
        "gates_ms": gates_ms,
        "summary_ms": summary_ms,
        "gates_vs_summary": round(gates_ms / summary_ms, 3),
        "tick_ms": tick_ms,
        "promote_ms": promote_ms,
        "tick_vs_promote": round(tick_ms / promote_ms, 3),
        "goal_met": tick_ms / 1000 <= GOAL_S,
    }


# -- many live rollouts at once ----------------------------------------------------------------

LIVE_MODELS = 100
LIVE_DEVICES = 1200
LIVE_PER_MODEL = 150  # devices running each model: 25 per (ring, tier) cell
LIVE_SOAK_S = 600.0
LIVE_PLAN = """
on_failure = "pause"
device_timeout = "3600s"
stage_deadline = "7200s"
[[stages]]
ring = "canary"
percent = 50
min_devices = 5
soak = "600s"
[[stages]]
ring = "pilot"
percent = 50
min_devices = 5
soak = "600s"
[[stages]]
ring = "ga"
percent = 100
min_devices = 5
soak = "600s"
[gates.install]
max_failure_rate = 0.2
min_devices = 5
[gates.health]
min_devices = 5
min_inferences = 1000
"""
OLD, NEW = "1.0.0", "2.0.0"
RINGS3 = ("canary", "pilot", "ga")


def _live_rows(names: list[str], t0: float) -> dict[str, list[dict[str, Any]]]:
    """The fleet rows of ``names``: devices, what each runs, its release states and its
    telemetry of both releases in the stage's window (deterministic; half of each model's
    canary devices on the new release, confirmed)."""
    import random

    from ota.fleet._models import LATENCY_COLUMNS
    from ota.fleet._telemetry import BUCKET_S, bucket_of

    rnd = random.Random(7)
    cells = [(r, t) for r in RINGS3 for t in ("a", "b")]
    devices = [
        {
            "id": i + 1,
            "device_id": f"live-{i:05d}",
            "credential_hash": f"{i:064x}",
            "ring": cells[i % 6][0],
            "tier": cells[i % 6][1],
            "enrolled_at": t0 - 86400,
        }
        for i in range(LIVE_DEVICES)
    ]
    stride = LIVE_DEVICES // LIVE_PER_MODEL  # 8: a multiple of the 6 cells' period is avoided
    models, states, aggs, bins = [], [], [], []
    b0 = bucket_of(t0)
    spec = "hist:0.0:1.0:8"
    for m, name in enumerate(names):
        for k in range(LIVE_PER_MODEL):
            pk = (m + k * stride) % LIVE_DEVICES + 1
            ring, tier = devices[pk - 1]["ring"], devices[pk - 1]["tier"]
            new = ring == "canary" and k % 2 == 0
            version = NEW if new else OLD
            models.append(
                {"device_pk": pk, "model": name, "version": version, "counter": 2 if new else 1,
                 "updated_at": t0, "ring": ring, "tier": tier, "active": True}
            )  # fmt: skip
            if new:
                states.append(
                    {"device_pk": pk, "model": name, "version": NEW, "state": "confirmed",
                     "detail": None, "updated_at": t0 + 30, "active": True}
                )  # fmt: skip
            for bucket in (b0, b0 + BUCKET_S):
                n = rnd.randint(300, 700)
                lat = dict.fromkeys(LATENCY_COLUMNS, 0)
                peak = 10 + (1 if tier == "b" else 0)
                lat[LATENCY_COLUMNS[peak]] = int(n * 0.7)
                lat[LATENCY_COLUMNS[peak + 1]] = n - int(n * 0.7) - 5
                lat[LATENCY_COLUMNS[peak + 2]] = 5
                aggs.append(
                    {"device_pk": pk, "model": name, "version": version, "bucket": bucket,
                     "summaries": 1, "inferences": n, "errors": rnd.randint(0, 1), "crashes": 0,
                     "latency_sum_s": n * 0.003, "updated_at": t0 + 40, **lat}
                )  # fmt: skip
                for b in range(8):
                    bins.append(
                        {"device_pk": pk, "model": name, "version": version, "bucket": bucket,
                         "output": "y", "spec": spec, "bin": b,
                         "count": max(1, int(n * (0.25 - abs(b - 3.5) * 0.06)))}
                    )  # fmt: skip
    return {
        "devices": devices,
        "device_models": models,
        "release_states": states,
        "telemetry_agg": aggs,
        "telemetry_bins": bins,
    }


def _load_live(engine: Any, rows: dict[str, list[dict[str, Any]]]) -> None:
    from sqlalchemy import insert

    from ota.fleet._models import Base

    with engine.begin() as conn:  # the models' tables: their column defaults apply
        for name, batch in rows.items():
            for i in range(0, len(batch), 20_000):
                conn.execute(insert(Base.metadata.tables[name]), batch[i : i + 20_000])


def _report(engine: Any, names: list[str], at: float) -> None:
    """One new telemetry report per model (a device of the new cohort): every rollout's
    inputs change, as in a fleet whose devices report every tick."""
    from sqlalchemy import text

    with engine.begin() as conn:
        for name in names:
            conn.execute(
                text(
                    "UPDATE telemetry_agg SET inferences = inferences + 1, updated_at = :t "
                    "WHERE device_pk = (SELECT min(device_pk) FROM telemetry_agg "
                    "WHERE model = :m AND version = :v) AND model = :m AND version = :v"
                ),
                {"t": at, "m": name, "v": NEW},
            )


def _backdate(engine: Any, names: list[str], by: float) -> None:
    """Move the stage start of the live rollouts of ``names`` back by ``by`` seconds (their
    soak ends earlier: rollouts started at different times)."""
    from sqlalchemy import text

    with engine.begin() as conn:
        for name in names:
            conn.execute(
                text(
                    "UPDATE rollouts SET stage_started_at = stage_started_at - :by "
                    "WHERE live_model = :m"
                ),
                {"by": by, "m": name},
            )


def _published_copy(work: Path, names: list[str], folder: Path) -> Any:
    """A fresh copy, in ``folder``, of the repository with both releases of every model
    (published once into ``<work>/live.published`` by ``bench.fleet_sim``'s helper)."""
    import shutil

    from bench.fleet_sim import _published
    from ota.repository import Project
    from tests.repo_helpers import make_project, publish_mlp

    src = work / "live"
    cache = work / "live.published"
    if not (cache / "names").is_file() or (cache / "names").read_text() != ",".join(names):
        _published(src, names, make_project, publish_mlp)
    shutil.rmtree(folder, ignore_errors=True)
    for part in ("proj", "repo", "models"):
        shutil.copytree(cache / part, folder / part, symlinks=True)
    conf = folder / "proj" / "ota.toml"
    origin = (cache / "origin").read_text()
    conf.write_text(conf.read_text().replace(f"{origin}/repo", f"{folder}/repo"))
    return Project.open(folder / "proj")


def measure_live(
    backend: str,
    n: int,
    repeat: int,
    work: Path,
    models: int = LIVE_MODELS,
    profile: Path | None = None,
) -> dict[str, Any]:
    from ota.fleet import FleetConfig, migrate
    from ota.fleet._db import make_engine
    from ota.rollout import _plugins, _store
    from ota.rollout._controller import Controller
    from ota.rollout._plan import plan_from_toml

    names = [f"m{k:03d}" for k in range(models)]
    if n > models:
        raise ValueError(f"{n} live rollouts need at least {n} models (--models)")
    folder = work / f"{backend}-n{n}"
    project = _published_copy(work, names, folder)
    if backend == "postgresql":
        from tests.fleet_fixtures import _start_postgres

        url = _start_postgres().create_db()
    else:
        db = work / f"live-{n}.sqlite3"
        db.unlink(missing_ok=True)
        url = f"sqlite:///{db}"
    migrate(url)
    engine = make_engine(FleetConfig(db_url=url))
    t0 = float(int(time.time()))
    log(f"{backend}: loading the fleet rows for {n} live rollout(s)")
    _load_live(engine, _live_rows(names, t0))
    plan = plan_from_toml(LIVE_PLAN)
    live = names[:n]
    for name in live:
        _store.start(engine, project, name, NEW, plan, "bench", now=t0)
    signed_at: list[float] = []  # perf_counter() at each signature (batch) of a tick
    ctl = Controller(
        engine,
        project,
        holder="bench",
        extra_gates=_plugins.extra_gates(),
        after_sign=lambda: signed_at.append(time.perf_counter()),
    )

    def timed(at: float) -> tuple[float, Any]:
        t = time.perf_counter()
        rep = ctl.tick(now=at)
        return time.perf_counter() - t, rep

    enter_s, rep = timed(t0 + 1)
    assert len([a for a in rep.actions if a.get("signed")]) == n, rep
    judge_s, rep = timed(t0 + 60)
    if rep.errors:
        raise RuntimeError(rep.errors)
    held = {g["gate"] for v in rep.verdicts for g in v["gates"] if g["status"] != "pass"}
    steady = [timed(t0 + 60 + 10 * (i + 1))[0] for i in range(repeat)]
    fresh = []
    for i in range(repeat):
        at = t0 + 120 + 10 * (i + 1)
        _report(engine, live, at - 1)
        fresh.append(timed(at)[0])
    if profile is not None:  # one more fresh tick, under the profiler (untimed)
        import cProfile

        at = t0 + 120 + 10 * (repeat + 1)
        _report(engine, live, at - 1)
        prof = cProfile.Profile()
        prof.runcall(ctl.tick, now=at)
        prof.dump_stats(str(profile.with_name(f"{profile.name}-{backend}-{n}")))
    # mixed: the soak of the last tenth (by id, judged last in id order) is over and every
    # rollout has a new report: how long until the due ones are signed (the long tail waits)
    due = live[-max(1, n // 10) :]
    _backdate(engine, due, LIVE_SOAK_S)
    at = t0 + 200
    _report(engine, live, at - 1)
    signed_at.clear()
    t = time.perf_counter()
    rep = ctl.tick(now=at)
    mixed_s = time.perf_counter() - t
    due_signed_s = (signed_at[0] - t) if signed_at else None
    early = len([a for a in rep.actions if a.get("signed")])
    promote_s, rep = timed(t0 + 60 + LIVE_SOAK_S)
    promoted = early + len([a for a in rep.actions if a.get("signed")])
    engine.dispose()
    return {
        "backend": backend,
        "live": n,
        "enter_s": round(enter_s, 3),
        "judge_s": round(judge_s, 3),
        "steady_s": round(statistics.median(steady), 3),
        "fresh_s": round(statistics.median(fresh), 3),
        "promote_s": round(promote_s, 3),
        "promoted": promoted,
        "mixed_s": round(mixed_s, 3),
        "mixed_due": len(due),
        "mixed_signed": early,
        "due_signed_s": round(due_signed_s, 3) if due_signed_s is not None else None,
        "first_holding_gates": sorted(held),
    }


def render_live(doc: dict[str, Any]) -> str:
    base = {r["backend"]: r for r in doc["results"] if r["live"] == doc["results"][0]["live"]}
    rows = []
    for r in doc["results"]:
        b = base[r["backend"]]
        rows.append(
            [
                r["backend"],
                r["live"],
                r["enter_s"],
                r["judge_s"],
                r["steady_s"],
                r["fresh_s"],
                round(r["fresh_s"] / max(b["fresh_s"], 1e-9), 1),
                r["promote_s"],
                r["promoted"],
                r["mixed_s"],
                f"{r['mixed_signed']}/{r['mixed_due']}",
                r["due_signed_s"],
            ]
        )
    return table(
        "one controller tick vs live rollouts (seconds)",
        [
            "backend",
            "live",
            "enter",
            "judge",
            "steady",
            "fresh",
            "fresh ratio",
            "promote",
            "ok",
            "mixed",
            "due signed",
            "due signed after",
        ],
        rows,
    )


def render(doc: dict[str, Any]) -> str:
    rows = [
        [
            r["devices"],
            r["gates_ms"],
            r["summary_ms"],
            r["gates_vs_summary"],
            r["tick_ms"],
            r["promote_ms"],
            r["tick_vs_promote"],
            "yes" if r["goal_met"] else "no",
        ]
        for r in doc["results"]
    ]
    return table(
        "rollout controller (SQLite, medians)",
        ["devices", "gates ms", "summary ms", "ratio", "tick ms", "promote ms", "ratio", "<= 5 s"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--live", default="", help="instead: ticks over N live rollouts")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--models", type=int, default=LIVE_MODELS, help="models published")
    parser.add_argument("--profile", default="", help="--live: cProfile a fresh tick into FILE")
    args = parser.parse_args(argv)
    if args.live:
        profile = Path(args.profile) if args.profile else None
        with scratch_dir(args.workdir) as work:
            live = [
                measure_live(b, int(n), args.repeat, work, args.models, profile)
                for b in args.backends.split(",")
                for n in args.live.split(",")
            ]
        doc = {"environment": environment(), "goal_s": GOAL_S, "results": live}
        emit(doc, render_live(doc), args.json)
        return
    with scratch_dir(args.workdir) as work:
        results = [measure(int(n), args.repeat, work) for n in args.sizes.split(",")]
    doc = {"environment": environment(), "goal_s": GOAL_S, "results": results}
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
