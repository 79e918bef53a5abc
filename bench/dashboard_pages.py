"""Server time of each dashboard page as the fleet grows (issue 10): 1,000 -> 100,000 devices
and up to 10 million events, SQLite (the default backend; ``--backends postgresql`` too).

Synthetic rows are bulk-loaded into the service's schema with ``bench.fleet_query``'s loaders
(untimed): devices over 3 rings, 3 tiers and 3 models of 3 versions, their derived rows, and
``--events-per-device`` raw events each; plus one rollout of ``seg 1.2.0`` with 30 verdicts
at its pilot stage and 4 h of telemetry aggregates from each device running ``seg`` (the
Rollout page's latency chart sums the pilot ring's rows of the stage's window).
Then each page is rendered by the real fleet app (with the dashboard blueprint) through
Flask's test client with a logged-in admin session: server time only (routing, session and
scope check, queries, template), no network. Median (best - max) of ``--repeat``.

The fleet-wide aggregates a page shows (adoption, ring x tier, failing devices, a release's
devices by ring and state) are cached per worker for ``summary_max_age_s`` (dashboard
``_cache``, as the fleet summary, ADR 0007): the ``*_recount`` rows time those pages with the
cache emptied first — what the first view after the cache expires costs.

Baseline, same run, same client: ``GET /v1/health`` (routing and one ``SELECT 1``), so
``server_ms`` is each page's median minus that floor. Goal: <= 300 ms per page at 100,000
devices and 10 M events.

The Release page is timed without a repository project (its fleet side only: states, devices
running it): its audit part (``ota audit``: TUF chain, every chunk hashed) costs what the
release's size costs, not the fleet's, and is measured by ``bench.publish_speed``'s audits.

Run: ``python -m bench.dashboard_pages [--json] [--sizes 1000,10000,100000]
[--events-per-device 100] [--backends sqlite] [--repeat 5]``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from bench._common import base_parser, emit, environment, log, scratch_dir, table, time_ms
from bench.fleet_query import NOW, load_postgres, load_sqlite

GOAL_MS = 300.0


def _rollout(url: str) -> int:
    """One rollout of seg 1.2.0 at its second stage with 30 distinct verdicts."""
    from sqlalchemy.orm import Session

    from ota.fleet._config import FleetConfig
    from ota.fleet._db import make_engine
    from ota.fleet._rollout_models import Rollout, RolloutVerdict
    from ota.rollout._plan import default_plan

    plan = default_plan()
    engine = make_engine(FleetConfig(db_url=url))
    try:
        with Session(engine) as s, s.begin():
            r = Rollout(
                model="seg", version="1.2.0", baseline_version="1.1.0", live_model="seg",
                state="running", reason="holding", plan=plan.to_dict(),
                plan_sha256=plan.digest(), stage=1, stage_started_at=NOW - 3600,
                approved_stage=-1, created_at=NOW - 86400, created_by="bench",
                updated_at=NOW,
            )  # fmt: skip
            s.add(r)
            s.flush()
            gate = {"gate": "install.sample", "tier": "", "status": "hold", "reason": "few",
                    "value": 1.0, "threshold": 10.0, "baseline": None, "confidence": None,
                    "evidence": {"confirmed": 1}}  # fmt: skip
            for i in range(30):
                s.add(
                    RolloutVerdict(
                        rollout_id=r.id,
                        at=NOW - 3600 + i,
                        last_at=NOW - 3600 + i,
                        repeats=1,
                        stage=1,
                        action="hold",
                        reason=f"verdict {i}",
                        acted=False,
                        digest=f"{i:064x}",
                        gates=[gate] * 4,
                    )
                )
            rid = int(r.id)
    finally:
        engine.dispose()
    return rid


TELEMETRY_BUCKETS = 16  # 4 h of 900 s buckets per device: the rollout's window holds ~5
_LAT = {12: 100, 13: 200, 14: 80, 15: 20}  # the baseline's buckets; 1.2.0 one bucket slower


def _telemetry(url: str) -> int:
    """Telemetry aggregates of ``seg`` from every device running it (every ring: the chart
    must not read the other rings' rows), ``TELEMETRY_BUCKETS`` buckets each, ending at NOW,
    of whichever version it runs, as
    ``ota.fleet._telemetry`` folds them (one row per device, release and bucket): the Rollout
    page's latency chart sums the window's rows. One ``INSERT … SELECT`` on both backends."""
    from sqlalchemy import text

    from ota.fleet._config import FleetConfig
    from ota.fleet._db import make_engine
    from ota.fleet._models import LATENCY_COLUMNS
    from ota.fleet._telemetry import bucket_of

    def lat(j: int) -> str:
        new, base = _LAT.get(j - 1, 0), _LAT.get(j, 0)
        return f"CASE WHEN dm.version = '1.2.0' THEN {new} ELSE {base} END + (dm.device_pk % 7)"

    ks = " UNION ALL ".join(f"SELECT {k} AS k" for k in range(TELEMETRY_BUCKETS))
    total = f"{sum(_LAT.values())} + 30 * (dm.device_pk % 7)"
    sql = (
        "INSERT INTO telemetry_agg (device_pk, model, version, bucket, summaries, inferences, "
        f"errors, crashes, latency_sum_s, updated_at, {', '.join(LATENCY_COLUMNS)}) "
        f"SELECT dm.device_pk, 'seg', dm.version, {bucket_of(NOW)} - 900 * b.k, 3, {total}, 0, "
        f"0, 4.0, {NOW}, {', '.join(lat(j) for j in range(len(LATENCY_COLUMNS)))} "
        f"FROM device_models dm CROSS JOIN ({ks}) b "
        "WHERE dm.model = 'seg'"
    )
    engine = make_engine(FleetConfig(db_url=url))
    try:
        with engine.begin() as conn:
            n = conn.execute(text(sql)).rowcount
            conn.execute(text("ANALYZE telemetry_agg"))
    finally:
        engine.dispose()
    return int(n)


def measure(
    backend: str, n: int, events_per_device: int, repeat: int, workdir: Path
) -> dict[str, Any]:
    from ota.fleet import FleetConfig, migrate
    from ota.fleet._app import create_app
    from ota.fleet._local import create_token

    if backend == "postgresql":
        from tests.fleet_fixtures import _start_postgres

        url = _start_postgres().create_db()
        migrate(url)
        load_s = load_postgres(url, n, events_per_device)
    else:
        path = workdir / f"dash-{n}.sqlite3"
        path.unlink(missing_ok=True)
        url = f"sqlite:///{path}"
        migrate(url)
        load_s = load_sqlite(str(path), n, events_per_device)
    t0 = time.perf_counter()
    rid = _rollout(url)
    tel_rows = _telemetry(url)
    load_s += time.perf_counter() - t0
    log(f"{backend} {n} devices: loaded in {load_s:.1f} s ({tel_rows} telemetry rows)")
    os.environ["OTA_DASHBOARD_KEY_FILE"] = str(workdir / "dash.key")
    os.environ["OTA_PROJECT"] = str(workdir / "no-project")
    cfg = FleetConfig(db_url=url)
    token = create_token(cfg, f"bench-{n}-{time.time_ns()}", "admin", 3600)["token"]
    app = create_app(cfg)
    c = app.test_client()
    page = c.get("/dashboard/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    r = c.post("/dashboard/login", data={"csrf": csrf.group(1), "token": token})
    assert r.status_code == 303, r.text[:300]
    errors: list[str] = []
    mid = f"dev-{n // 3:07d}"

    def get(path: str) -> None:
        resp = c.get(path)
        if resp.status_code != 200:
            errors.append(f"{path}: {resp.status_code} {resp.text[:200]}")
        elif path.startswith("/dashboard/rollouts/") and 'id="latency"' not in resp.text:
            errors.append(f"{path}: no latency chart")

    get("/dashboard/")  # counts the summary once (then served from its cache, ADR 0007)
    health = time_ms(lambda: c.get("/v1/health"), repeat)
    pages = {
        "fleet": "/dashboard/?model=seg",
        "devices": "/dashboard/devices",
        "devices_filtered": "/dashboard/devices?model=seg&version=1.2.0&ring=pilot",
        "devices_silent": "/dashboard/devices?silent=1",
        "device": f"/dashboard/devices/{mid}",
        "device_older_events": f"/dashboard/devices/{mid}?before={(n // 3) * events_per_device}",
        "rollouts": "/dashboard/rollouts",
        "rollout": f"/dashboard/rollouts/{rid}",
        "release_fleet_side": "/dashboard/releases/seg/1.2.0",
    }
    timings = {name: time_ms(lambda p=path: get(p), repeat) for name, path in pages.items()}
    from ota.dashboard import _cache

    def recount(path: str) -> None:
        _cache.clear()  # what the first view after max_age costs (one worker, once per 10 s)
        get(path)

    for name in ("fleet", "rollout", "release_fleet_side"):
        timings[f"{name}_recount"] = time_ms(lambda p=pages[name]: recount(p), repeat)
    for t in timings.values():
        t["server_ms"] = round(max(0.0, t["median_ms"] - health["median_ms"]), 2)
        t["goal_met"] = t["median_ms"] <= GOAL_MS and not errors
    app.extensions["ota_fleet"]["engine"].dispose()
    return {
        "backend": backend,
        "devices": n,
        "events": n * events_per_device,
        "telemetry_rows": tel_rows,
        "load_s": round(load_s, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "health_baseline": health,
        "pages": timings,
        "errors": sorted(set(errors))[:10],
    }


def render(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["results"]:
        for name, t in r["pages"].items():
            rows.append([r["backend"], f"{r['devices']:,}", f"{r['events']:,}", name,
                         t["median_ms"], f"{t['best_ms']}-{t['max_ms']}",
                         r["health_baseline"]["median_ms"],
                         "yes" if t["goal_met"] else "NO"])  # fmt: skip
    return table(
        f"dashboard pages, server time, median of {doc['repeat']} (goal <= {GOAL_MS:g} ms)",
        ["backend", "devices", "events", "page", "median ms", "best-max", "floor ms", "goal"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--events-per-device", type=int, default=100)
    p.add_argument("--backends", default="sqlite")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    results = []
    with scratch_dir(a.workdir) as work:
        for backend in a.backends.split(","):
            for n in (int(x) for x in a.sizes.split(",")):
                results.append(measure(backend, n, a.events_per_device, a.repeat, work))
                log(json.dumps(results[-1]))
    doc = {
        "benchmark": "dashboard_pages",
        "results": results,
        "goal_ms": GOAL_MS,
        "repeat": a.repeat,
        "events_per_device": a.events_per_device,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    emit(doc, render(doc), a.json)


if __name__ == "__main__":
    main()
