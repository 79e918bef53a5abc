"""The cost of the rollout gauges on the fleet service's ``GET /metrics`` (issue 9, ADR 0011).

``fleet/_metrics.py`` registers :class:`ota.rollout._metrics.RolloutCollector` beside the fleet
gauges, so every scrape reads the live rollouts and their latest verdicts. Synthetic rollouts
are written into the service's schema (untimed): ``n`` live ones, four times as many ended
ones, each with ``VERDICTS`` verdicts of ``GATES`` gates (the collector must read only the live
rollouts' latest verdicts). Then, same run, same database:

* ``query_ms``: the collector's one statement (:meth:`RolloutCollector.rows`);
* ``rollout_ms``: one exposition of the rollout gauges (query + text), against the baseline
  ``fleet_ms``: one exposition of the fleet gauges from the cached fleet summary (what every
  scrape already costs); ``samples``: lines of rollout gauges in it;
* ``statements``: SQL statements the rollout gauges ran (goal: one, whatever ``n``).

Run: ``python -m bench.rollout_scrape [--json] [--sizes 1,50,500] [--repeat 20]
[--backends sqlite,postgresql]``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench._common import base_parser, emit, environment, log, ratio, scratch_dir, table, time_ms

VERDICTS = 20
GATES = 30


def _fill(engine: Any, live: int) -> None:
    from sqlalchemy.orm import Session

    from ota.fleet._rollout_models import Rollout, RolloutVerdict
    from ota.rollout._plan import default_plan

    plan = default_plan().to_dict()
    gates = [
        {"gate": f"health.g{k}", "tier": "t", "status": "hold", "value": 1.5, "threshold": 2.0,
         "reason": "x" * 80, "evidence": {"new_devices": 12, "baseline_devices": 11}}
        for k in range(GATES)
    ]  # fmt: skip
    with Session(engine) as s, s.begin():
        for i in range(5 * live):
            on = i % 5 == 0
            r = Rollout(
                model=f"m{i}", version="1.0.0", live_model=f"m{i}" if on else None,
                state="running" if on else "done", plan=plan, plan_sha256="0" * 64, stage=2,
                stage_started_at=0.0, created_at=0.0, updated_at=0.0,
            )  # fmt: skip
            s.add(r)
            s.flush()
            s.add_all(
                RolloutVerdict(
                    rollout_id=r.id,
                    at=k,
                    last_at=k,
                    stage=2,
                    action="hold",
                    digest=str(k),
                    gates=gates,
                )
                for k in range(VERDICTS)
            )


def measure(backend: str, n: int, repeat: int, work: Path) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest
    from sqlalchemy import event

    from ota.fleet import FleetConfig, migrate
    from ota.fleet._db import make_engine, read_only
    from ota.fleet._metrics import _FleetCollector
    from ota.rollout._metrics import RolloutCollector

    if backend == "postgresql":
        from tests.fleet_fixtures import _start_postgres

        url = _start_postgres().create_db()
    else:
        path = work / f"scrape-{n}.sqlite3"
        path.unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    migrate(url)
    engine = make_engine(FleetConfig(db_url=url))
    try:
        t0 = time.perf_counter()
        _fill(engine, n)
        log(f"{backend} {n} live rollouts: loaded in {time.perf_counter() - t0:.1f} s")
        reader = read_only(engine)
        fleet = CollectorRegistry()
        fleet.register(_FleetCollector(engine, reader, 86400.0, 3600.0))
        rollouts = CollectorRegistry()
        rollouts.register(RolloutCollector(reader))
        generate_latest(fleet)  # the first scrape counts and caches the fleet summary
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(str(args[2]))

        event.listen(reader, "before_cursor_execute", count)
        text = generate_latest(rollouts).decode()
        event.remove(reader, "before_cursor_execute", count)
        selects = sum(q.lstrip().upper().startswith("SELECT") for q in statements)
        fleet_t = time_ms(lambda: generate_latest(fleet), repeat)
        roll_t = time_ms(lambda: generate_latest(rollouts), repeat)
        query_t = time_ms(RolloutCollector(reader).rows, repeat)
    finally:
        engine.dispose()
    return {
        "backend": backend,
        "live_rollouts": n,
        "ended_rollouts": 4 * n,
        "verdicts": 5 * n * VERDICTS,
        "series": text.count("edge_ota_rollout_gate_status{"),
        "statements": selects,
        "samples": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
        "query_ms": query_t["median_ms"],
        "rollout_ms": roll_t["median_ms"],
        "rollout_max_ms": roll_t["max_ms"],
        "fleet_ms": fleet_t["median_ms"],
        "ratio": ratio(roll_t["median_ms"], fleet_t["median_ms"]),
    }


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--sizes", default="1,50,500")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--backends", default="sqlite")
    a = p.parse_args()
    rows = []
    with scratch_dir(a.workdir) as work:
        for backend in a.backends.split(","):
            for n in (int(x) for x in a.sizes.split(",")):
                rows.append(measure(backend, n, a.repeat, work))
    doc = {"environment": environment(), "results": rows}
    cols = ["backend", "live_rollouts", "verdicts", "series", "samples", "statements",
            "query_ms", "rollout_ms", "rollout_max_ms", "fleet_ms", "ratio"]  # fmt: skip
    emit(doc, table("rollout gauges per scrape", cols, [[r[c] for c in cols] for r in rows]),
         a.json)  # fmt: skip


if __name__ == "__main__":
    main()
