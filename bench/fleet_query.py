"""Fleet queries as the fleet grows: the fleet summary (``GET /v1/fleet``) and a filtered
device list (``GET /v1/devices?model=&version=&ring=``, one page of 100) at 1,000 -> 100,000
devices and up to 10 million events, through the real service (gunicorn), on PostgreSQL and
SQLite; and the service's memory at each size.

Synthetic rows are bulk-loaded straight into the service's schema (PostgreSQL ``COPY``, SQLite
``executemany``), untimed: devices spread over 3 rings, 3 tiers and 3 models of 3 versions, each
with its derived rows (models run, release states) and ``--events-per-device`` raw events
spread over 30 days. Then the schema's own statistics are refreshed (``ANALYZE``) and the API is
timed: the best and the median of ``--repeat`` calls, client wall time over loopback.

The summary is timed twice: as an operator's dashboard polls it (``max_age=3600``: the
count cached by the service, ADR 0007) and as a full recount (``max_age=0``, what every call
cost before the cache, and what each cache refresh costs one worker).

Baseline, same run: ``GET /v1/health`` (routing, one ``SELECT 1``), the floor of one HTTP
call here; ``server_ms`` is a query's time minus that floor. Goal (issue 8): <= 100 ms at
100,000 devices and 10 M events; memory flat as the fleet grows.

Run: ``python -m bench.fleet_query [--json] [--sizes 1000,10000,100000]
[--events-per-device 100] [--backends postgresql,sqlite]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._common import base_parser, emit, environment, log, scratch_dir, table, time_ms
from bench.fleet_ingest import group_rss_mb

GOAL_MS = 100.0
RINGS = ("ga", "ga", "ga", "ga", "pilot", "canary")
TIERS = ("default", "npu", "lowmem")
MODELS = ("det", "seg", "cls")
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
HEALTH = ("ok", "ok", "ok", "ok", "failing", "unknown")
KINDS = ("checked", "downloaded", "staged", "smoke_passed", "committed", "confirmed")
NOW = 1_780_000_000.0
FILTERED = "/v1/devices?model=seg&version=1.2.0&ring=pilot&limit=100"


def _devices(n: int) -> Iterator[dict[str, Any]]:
    for i in range(1, n + 1):
        yield {
            "id": i,
            "device_id": f"dev-{i:07d}",
            "credential_hash": f"{i:064x}",
            "ring": RINGS[i % len(RINGS)],
            "tier": TIERS[i % len(TIERS)],
            "claimed_ring": RINGS[i % len(RINGS)],
            "claimed_tier": TIERS[i % len(TIERS)],
            "arch": "aarch64",
            "runtime_version": "1.31.1",
            "client_version": "0.1.0",
            "enrolled_at": NOW - 86400 * 60,
            "enrolled_by": "enroll-bench",
            "last_seen": NOW - (i % 172800),
            "last_device_time": NOW - (i % 172800),
            "last_kind": "confirmed",
            "last_outcome": "confirmed",
            "last_outcome_model": MODELS[i % 3],
            "last_outcome_version": VERSIONS[i % 3],
            "last_outcome_at": NOW - (i % 172800),
            "health": HEALTH[i % len(HEALTH)],
            "claims_changed": False,
            "claims_note": "",
            "events_total": 0,
            "dropped_total": 0,
            "rate_window_start": 0.0,
            "rate_count": 0,
        }


def _row(table: Any, given: dict[str, Any]) -> tuple[Any, ...]:
    """Values for every column of ``table``: ``given``, else the column's scalar default."""
    out = []
    for col in table.columns:
        if col.name in given:
            out.append(given[col.name])
        elif col.default is not None and not callable(col.default.arg):
            out.append(col.default.arg)
        else:
            out.append(None)
    return tuple(out)


def _rows(n_devices: int, events_per_device: int) -> dict[str, Iterator[tuple[Any, ...]]]:
    from ota.fleet._models import Device, DeviceModel, Queue, ReleaseState

    def devices() -> Iterator[tuple[Any, ...]]:
        for d in _devices(n_devices):
            d["events_total"] = events_per_device
            yield _row(Device.__table__, d)

    def models() -> Iterator[tuple[Any, ...]]:
        for i in range(1, n_devices + 1):
            for k, m in enumerate(MODELS[: 1 + i % 3]):
                yield _row(
                    DeviceModel.__table__,
                    {
                        "device_pk": i,
                        "model": m,
                        "version": VERSIONS[(i + k) % 3],
                        "counter": 1 + (i + k) % 3,
                        "updated_at": NOW - (i % 86400),
                        "ring": RINGS[i % len(RINGS)],  # the device's (the summary's columns)
                        "tier": TIERS[i % len(TIERS)],
                        "active": True,
                    },
                )

    def states() -> Iterator[tuple[Any, ...]]:
        for i in range(1, n_devices + 1):
            for k, m in enumerate(MODELS[: 1 + i % 3]):
                yield _row(
                    ReleaseState.__table__,
                    {
                        "device_pk": i,
                        "model": m,
                        "version": VERSIONS[(i + k) % 3],
                        "state": "confirmed" if i % 10 else "reverted",
                        "detail": None,
                        "updated_at": NOW - (i % 86400),
                        "active": True,
                    },
                )

    def queues() -> Iterator[tuple[Any, ...]]:
        for i in range(1, n_devices + 1):
            yield _row(
                Queue.__table__,
                {
                    "device_pk": i,
                    "epoch": "q",
                    "high_seq": events_per_device,
                    "dropped": 0,
                    "first_seen": NOW - 86400 * 30,
                },
            )

    return {
        "devices": devices(),
        "device_models": models(),
        "release_states": states(),
        "queues": queues(),
    }


def _columns(name: str) -> list[str]:
    from ota.fleet._models import Base

    return [c.name for c in Base.metadata.tables[name].columns]


def _json_cols(name: str) -> set[int]:
    from sqlalchemy import JSON

    from ota.fleet._models import Base

    return {i for i, c in enumerate(Base.metadata.tables[name].columns) if isinstance(c.type, JSON)}


def _case(expr: str, values: tuple[str, ...]) -> str:
    whens = " ".join(f"WHEN {i} THEN '{v}'" for i, v in enumerate(values))
    return f"CASE {expr} {whens} END"


def _events_select(n_devices: int, per: int, dev: str, seq: str, json_fn: str) -> str:
    """The SELECT list of synthetic events (generated by the database: 10 M rows never pass
    through Python): ``per`` events per device spread over 30 days."""
    span = 86400 * 30
    t = f"({NOW - span} + {seq} * {span}.0 / {per + 1})"
    return (
        f"({dev} - 1) * {per} + {seq}, {dev}, 'q', {seq}, "
        f"{_case(f'{seq} % {len(KINDS)}', KINDS)}, {_case(f'{dev} % 3', MODELS)}, "
        f"{_case(f'{dev} % 3', VERSIONS)}, {t}, {t}, {json_fn}('n', {seq})"
    )


_EVENT_COLS = "id, device_pk, epoch, seq, kind, model, version, device_time, received_at, data"


def load_postgres(url: str, n_devices: int, events_per_device: int) -> float:
    import psycopg

    t0 = time.perf_counter()
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for name, rows in _rows(n_devices, events_per_device).items():
            cols = _columns(name)
            js = _json_cols(name)
            with cur.copy(f"COPY {name} ({', '.join(cols)}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(
                        [json.dumps(v) if i in js and v is not None else v for i, v in enumerate(r)]
                    )
        # events: indexes and constraints off while loading, rebuilt after (as pg_restore)
        cur.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'events'::regclass AND contype IN ('u', 'f')"
        )
        constraints = cur.fetchall()
        cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events' "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'events'::regclass)"
        )
        indexes = cur.fetchall()
        for name, _ in constraints:
            cur.execute(f'ALTER TABLE events DROP CONSTRAINT "{name}"')
        for name, _ in indexes:
            cur.execute(f'DROP INDEX "{name}"')
        cur.execute(
            f"INSERT INTO events ({_EVENT_COLS}) SELECT "
            f"{_events_select(n_devices, events_per_device, 'd', 's', 'json_build_object')}"
            f" FROM generate_series(1, {n_devices}) d, "
            f"generate_series(1, {events_per_device}) s"
        )
        for _, ddl in indexes:
            cur.execute(ddl)
        for name, ddl in constraints:
            cur.execute(f'ALTER TABLE events ADD CONSTRAINT "{name}" {ddl}')
        for name in ("devices", "events"):  # serial ids continue after the loaded ones
            cur.execute(
                f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                f"(SELECT COALESCE(MAX(id), 1) FROM {name}))"
            )
        conn.commit()
        conn.autocommit = True
        cur.execute("ANALYZE")
    return time.perf_counter() - t0


def load_sqlite(path: str, n_devices: int, events_per_device: int) -> float:
    import sqlite3

    t0 = time.perf_counter()
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        for name, rows in _rows(n_devices, events_per_device).items():
            cols = _columns(name)
            js = _json_cols(name)
            marks = ", ".join("?" * len(cols))
            sql = f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({marks})"
            batch: list[tuple[Any, ...]] = []
            for r in rows:
                batch.append(
                    tuple(
                        json.dumps(v) if i in js and v is not None else v for i, v in enumerate(r)
                    )
                )
                if len(batch) >= 50_000:
                    conn.executemany(sql, batch)
                    batch.clear()
            conn.executemany(sql, batch)
            conn.commit()
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
            "tbl_name = 'events' AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        per = events_per_device
        conn.execute(
            f"INSERT INTO events ({_EVENT_COLS}) WITH RECURSIVE "
            f"d(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM d WHERE x < {n_devices}), "
            f"s(y) AS (SELECT 1 UNION ALL SELECT y + 1 FROM s WHERE y < {per}) "
            f"SELECT {_events_select(n_devices, per, 'x', 'y', 'json_object')} FROM d, s"
        )
        for _, ddl in indexes:
            conn.execute(ddl)
        conn.commit()
        conn.execute("ANALYZE")
        conn.commit()
    finally:
        conn.close()
    return time.perf_counter() - t0


def measure(
    backend: str, n_devices: int, events_per_device: int, repeat: int, workdir: Path
) -> dict[str, Any]:
    from ota.fleet import migrate
    from tests.fleet_fixtures import _start_postgres, call, start_service

    if backend == "postgresql":
        url = _start_postgres().create_db()
        migrate(url)
        load_s = load_postgres(url, n_devices, events_per_device)
    else:
        path = workdir / f"fleet-{n_devices}.sqlite3"
        path.unlink(missing_ok=True)
        url = f"sqlite:///{path}"
        migrate(url)
        load_s = load_sqlite(str(path), n_devices, events_per_device)
    log(f"{backend} {n_devices} devices: loaded in {load_s:.1f} s")
    errors: list[str] = []
    with start_service(url) as svc:
        read = svc.operator_token("read")
        rss_idle = group_rss_mb(svc.proc.pid)

        def get(path: str) -> Any:
            r = call("GET", f"{svc.url}{path}", token=read)
            if r.status != 200:
                errors.append(f"{path}: HTTP {r.status} {r.raw[:200]!r}")
                log(f"{backend} {n_devices}: {errors[-1]}\n{svc.log_text()[-1500:]}")
            return r.doc

        summary = get("/v1/fleet?max_age=0")  # counted now, and cached
        if summary and summary["devices"]["total"] != n_devices:
            errors.append(f"summary counts {summary['devices']['total']} devices")
        cached = get("/v1/fleet?max_age=3600")
        if summary and cached and cached.get("as_of") != summary.get("as_of"):
            errors.append("the summary was recounted although its cache was fresh")
        health = time_ms(lambda: call("GET", f"{svc.url}/v1/health"), repeat)
        timings = {
            name: time_ms(lambda p=path: get(p), repeat)
            for name, path in (
                # the operator's poll: the cached count (one row) while fresh enough
                ("summary", "/v1/fleet?max_age=3600"),
                # a full recount (what every summary cost before the cache; max_age=0)
                ("summary_recount", "/v1/fleet?max_age=0"),
                ("devices_filtered", FILTERED),
                (
                    "devices_failing_page",
                    f"/v1/devices?health=failing&limit=100&after=dev-{n_devices // 2:07d}",
                ),
                ("device_detail", f"/v1/devices/dev-{n_devices // 3:07d}"),
                ("metrics_scrape", "/metrics"),  # the fleet gauges, from the database
            )
        }
        page = get(FILTERED)
        if page is not None and not page.get("devices"):
            errors.append("the filtered list matched nothing")
        rss_after = group_rss_mb(svc.proc.pid)
    for t in timings.values():
        t["server_ms"] = round(max(0.0, t["median_ms"] - health["median_ms"]), 2)
        t["goal_met"] = t["median_ms"] <= GOAL_MS and not errors
    return {
        "backend": backend,
        "devices": n_devices,
        "events": n_devices * events_per_device,
        "load_s": round(load_s, 1),
        "health_baseline": health,
        "queries": timings,
        "service_rss_mb": {"idle": rss_idle, "after_queries": rss_after},
        "errors": errors[:10],
    }


def run(
    backends: list[str], sizes: list[int], events_per_device: int, repeat: int, workdir: Path
) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = []
    for b in backends:
        for n in sizes:
            rows.append(measure(b, n, events_per_device, repeat, workdir))
            log(json.dumps(rows[-1]))  # each size as soon as it is measured
    return {
        "benchmark": "fleet_query",
        "results": rows,
        "goal_ms": GOAL_MS,
        "events_per_device": events_per_device,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["results"]:
        q = r["queries"]
        rows.append(
            [
                r["backend"],
                r["devices"],
                r["events"],
                f"{q['summary']['median_ms']} (max {q['summary']['max_ms']})",
                q["summary_recount"]["median_ms"],
                q["devices_filtered"]["median_ms"],
                q["devices_failing_page"]["median_ms"],
                q["device_detail"]["median_ms"],
                q["metrics_scrape"]["median_ms"],
                r["health_baseline"]["median_ms"],
                r["service_rss_mb"]["after_queries"],
                r["load_s"],
            ]
        )
    return (
        table(
            f"fleet_query: median client ms over loopback (goal <= {doc['goal_ms']:.0f} ms"
            " at 100k devices / 10 M events)",
            [
                "backend",
                "devices",
                "events",
                "summary (cached)",
                "recount",
                "filtered list",
                "failing page",
                "device",
                "/metrics",
                "health floor",
                "service MiB",
                "load s",
            ],
            rows,
        )
        + f"\nload average at the end: {doc['environment'].get('loadavg')}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "fleet_query")
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--events-per-device", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    with scratch_dir(args.workdir) as work:
        doc = run(
            args.backends.split(","),
            [int(s) for s in args.sizes.split(",")],
            args.events_per_device,
            args.repeat,
            work,
        )
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
