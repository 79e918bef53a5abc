"""Fleet ingestion rate: device reports of 10 events each through the real service (``ota fleet
serve``, gunicorn gthread workers) on PostgreSQL and SQLite, load generator on the same machine.

The load generator is ``--clients`` processes, each posting ``edge-ota.report/1`` reports for
its own share of ``--devices`` enrolled devices (a device's reports are sequential, as on a
real device) over one kept-alive HTTP/1.1 connection (as the device client's connection pool
does between the batches of a flush; ``--new-connection`` opens one per request instead), for
``--seconds``, ``--rounds`` times; figures are the median of the rounds with their range.
Every report must be acknowledged with its highest seq; anything else is counted by status.

Baseline, same run, same load generator and service: ``GET /v1/health`` (routing, one
``SELECT 1``, JSON) - the ceiling of the HTTP stack and the load generator on this machine; the
ratio says what ingestion itself costs on top. What bounds the rate is shown by where the CPU
went during the run (``/proc``): service workers, PostgreSQL backends, the load generator, and
the machine's total against its cores.

Goal (issue 8): >= 2,000 reports/s on PostgreSQL (a million devices every 8 minutes).

Run: ``python -m bench.fleet_ingest [--json] [--seconds 10] [--backends postgresql,sqlite]``.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import os
import statistics
import time
import urllib.parse
from pathlib import Path
from typing import Any

from bench._common import base_parser, emit, environment, log, ratio, scratch_dir, table

GOAL_REPORTS_S = 2000.0
_TICK = os.sysconf("SC_CLK_TCK")


def report(device_id: str, first: int, events: int) -> dict[str, Any]:
    return {
        "format": "edge-ota.report/1",
        "device": {
            "id": device_id,
            "ring": "ga",
            "tier": "default",
            "arch": "x86_64",
            "runtime_version": "1.31.1",
            "client_version": "0.1.0",
            "models": {"det": {"version": "1.0.0", "counter": 1}},
        },
        "queue": "bench-q",
        "dropped": 0,
        "events": [
            {
                "seq": s,
                "time": 1_700_000_000.0 + s,
                "kind": "checked",
                "model": "det",
                "version": "1.0.0",
                "data": {"elapsed_s": 0.01},
            }
            for s in range(first, first + events)
        ],
    }


def _client(
    url: str,
    devices: list[tuple[str, str]],
    events: int,
    start_at: float,
    seconds: float,
    queue: Any,
    new_connection: bool,
) -> None:
    """One load-generator process: reports (or health GETs when ``events`` is 0)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    next_seq = dict.fromkeys((d for d, _ in devices), 1)
    ok = 0
    statuses: dict[str, int] = {}
    lat: list[float] = []
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = os.times()
    end = start_at + seconds
    i = 0
    conn: http.client.HTTPConnection | None = None
    while time.time() < end:
        t0 = time.perf_counter()
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=60)
        if events:
            device, cred = devices[i % len(devices)]
            i += 1
            first = next_seq[device]
            body = json.dumps(report(device, first, events)).encode()
            conn.request(
                "POST",
                f"/v1/devices/{device}/events",
                body,
                {"Content-Type": "application/json", "Authorization": f"Bearer {cred}"},
            )
        else:
            conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        data = resp.read()
        if new_connection or resp.will_close:
            conn.close()
            conn = None
        lat.append(time.perf_counter() - t0)
        if resp.status == 200:
            if events:
                assert json.loads(data)["ack"] == first + events - 1, data[:200]
                next_seq[device] = first + events
            ok += 1
        else:
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
    cpu1 = os.times()
    queue.put(
        {
            "ok": ok,
            "statuses": statuses,
            "lat": lat,
            "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        }
    )


def _proc_cpu(match: Any) -> float:
    """CPU seconds (user + system) of the processes ``match(pid, comm, pgrp)`` selects."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        if match(int(entry), comm, int(fields[2])):
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def _machine_cpu() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return (sum(vals[:8]) - idle) / _TICK


def group_rss_mb(pgid: int) -> float:
    """Resident memory of a process group (the service: master and workers), MiB."""
    pages = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
            if int(raw[raw.rindex(")") + 2 :].split()[2]) != pgid:
                continue
            pages += int(Path(f"/proc/{entry}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024), 1)


def load(
    url: str,
    devices: list[tuple[str, str]],
    clients: int,
    events: int,
    seconds: float,
    pgid: int,
    new_connection: bool = False,
) -> dict[str, Any]:
    """Run the load generator; rates, latencies and where the CPU went."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    start_at = time.time() + 0.5
    shares = [devices[i::clients] for i in range(clients)]
    procs = [
        ctx.Process(
            target=_client, args=(url, share, events, start_at, seconds, queue, new_connection)
        )
        for share in shares
    ]
    for p in procs:
        p.start()
    while time.time() < start_at:
        time.sleep(0.001)
    svc0 = _proc_cpu(lambda _p, _c, g: g == pgid)
    pg0 = _proc_cpu(lambda _p, c, _g: c.startswith("postgres"))
    m0 = _machine_cpu()
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    svc1 = _proc_cpu(lambda _p, _c, g: g == pgid)
    pg1 = _proc_cpu(lambda _p, c, _g: c.startswith("postgres"))
    m1 = _machine_cpu()
    for p in procs:
        p.join(timeout=60)
    ok = sum(r["ok"] for r in results)
    lat = sorted(x for r in results for x in r["lat"])
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    cores = os.cpu_count() or 1
    return {
        "requests_ok": ok,
        "per_s": round(ok / seconds, 1),
        "events_per_s": round(ok * events / seconds, 1),
        "other_statuses": statuses,
        "latency_ms": {
            "p50": round(1000 * statistics.median(lat), 2) if lat else None,
            "p95": round(1000 * lat[int(0.95 * (len(lat) - 1))], 2) if lat else None,
        },
        "cpu_s": {
            "service": round(svc1 - svc0, 2),
            "postgres": round(pg1 - pg0, 2),
            "load_generator": round(sum(r["cpu_s"] for r in results), 2),
            "machine": round(m1 - m0, 2),
            "machine_capacity": round(cores * seconds, 2),
        },
        "service_rss_mb": group_rss_mb(pgid),
        # per request, independent of what else the machine runs: what bounds the rate
        "cpu_ms_per_request": {
            "service": _per(svc1 - svc0, ok),
            "postgres": _per(pg1 - pg0, ok),
            "load_generator": _per(sum(r["cpu_s"] for r in results), ok),
        },
        "ceiling_per_s_all_cores": round(
            cores / max(1e-9, (svc1 - svc0) + (pg1 - pg0) + sum(r["cpu_s"] for r in results)) * ok,
            1,
        ),
    }


def _per(cpu_s: float, n: int) -> float | None:
    return round(1000 * cpu_s / n, 3) if n else None


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose rate is the median (the lower middle one for an even count)."""
    ordered = sorted(rounds, key=lambda r: r["per_s"])
    return ordered[(len(ordered) - 1) // 2]


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def run(
    backends: list[str],
    seconds: float,
    devices_n: int,
    clients: int,
    workers: int,
    events: int,
    workdir: Path,
    *,
    threads: int = 4,
    rounds: int = 1,
    new_connection: bool = False,
) -> dict[str, Any]:
    from tests.fleet_fixtures import _start_postgres, new_db, start_service

    t0 = time.perf_counter()
    rows = []
    for backend in backends:
        pg = _start_postgres() if backend == "postgresql" else None
        url = new_db(backend, pg, workdir)
        args = ("--max-reports-per-minute", "100000", "--threads", str(threads))
        bases, ings, loadavg = [], [], []
        with start_service(url, *args, workers=workers) as svc:
            log(f"{backend}: enrolling {devices_n} devices")
            devs = [(f"bench-{i:05d}", svc.enroll(f"bench-{i:05d}")) for i in range(devices_n)]
            for k in range(rounds):
                # interleaved: each round's ratio compares figures taken under the same load
                log(f"{backend} round {k + 1}/{rounds}: GET /v1/health, then reports, {seconds} s")
                loadavg.append(os.getloadavg()[0])
                bases.append(load(svc.url, devs, clients, 0, seconds, svc.proc.pid, new_connection))
                ings.append(
                    load(svc.url, devs, clients, events, seconds, svc.proc.pid, new_connection)
                )
            loadavg.append(os.getloadavg()[0])
        ing, base = _median_round(ings), _median_round(bases)
        rows.append(
            {
                "backend": backend,
                "workers": workers,
                "threads": threads,
                "clients": clients,
                "devices": devices_n,
                "events_per_report": events,
                "connection": "new per request" if new_connection else "kept alive",
                "rounds": rounds,
                "reports": ing,
                "baseline_health": base,
                "reports_over_baseline": ratio(ing["per_s"], base["per_s"]),
                "spread": {
                    "reports_per_s": _spread([r["per_s"] for r in ings]),
                    "health_per_s": _spread([r["per_s"] for r in bases]),
                    "ratio": _spread(
                        [i["per_s"] / b["per_s"] for i, b in zip(ings, bases, strict=True)]
                    ),
                    "cpu_ms_per_report": {
                        part: _spread([r["cpu_ms_per_request"][part] or 0.0 for r in ings])
                        for part in ("service", "postgres", "load_generator")
                    },
                    "ceiling_per_s": _spread([r["ceiling_per_s_all_cores"] for r in ings]),
                    "load_average_1min": _spread(loadavg),
                },
                "goal_met": ing["per_s"] >= GOAL_REPORTS_S if backend == "postgresql" else None,
            }
        )
        log(f"{backend}: {ing['per_s']} reports/s (health baseline {base['per_s']}/s)")
    return {
        "benchmark": "fleet_ingest",
        "seconds": seconds,
        "results": rows,
        "goal_reports_per_s": GOAL_REPORTS_S,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["results"]:
        ing, sp = r["reports"], r["spread"]
        cpu = sp["cpu_ms_per_report"]

        def rng(d: dict[str, float]) -> str:
            return f"{d['median']:g} ({d['min']:g}-{d['max']:g})"

        rows.append(
            [
                r["backend"],
                rng(sp["reports_per_s"]),
                rng(sp["health_per_s"]),
                rng(sp["ratio"]),
                f"{ing['latency_ms']['p50']}/{ing['latency_ms']['p95']}",
                f"{cpu['service']['median']:g}/{cpu['postgres']['median']:g}/"
                f"{cpu['load_generator']['median']:g}",
                f"{ing['cpu_s']['machine']}/{ing['cpu_s']['machine_capacity']}",
                rng(sp["ceiling_per_s"]),
                rng(sp["load_average_1min"]),
                sum(ing["other_statuses"].values()),
            ]
        )
    first = doc["results"][0]
    return table(
        f"fleet_ingest: reports of {first['events_per_report']} events, gunicorn "
        f"{first['workers']} workers x {first['threads']} threads, {first['clients']} load "
        f"processes, connections {first['connection']}, {first['rounds']} rounds of "
        f"{doc['seconds']} s, median (min-max) (goal >= {doc['goal_reports_per_s']:.0f}/s on "
        "PostgreSQL)",
        [
            "backend",
            "reports/s",
            "health/s",
            "ratio",
            "p50/p95 ms",
            "cpu ms/report svc/pg/load",
            "cpu s used/cap",
            "ceiling/s",
            "load avg",
            "non-200",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "fleet_ingest")
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-connection", action="store_true")
    args = parser.parse_args(argv)
    with scratch_dir(args.workdir) as work:
        doc = run(
            args.backends.split(","),
            args.seconds,
            args.devices,
            args.clients,
            args.workers,
            args.events,
            work,
            threads=args.threads,
            rounds=args.rounds,
            new_connection=args.new_connection,
        )
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
