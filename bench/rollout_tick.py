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

Run: ``python -m bench.rollout_tick [--json] [--sizes 1000,10000,100000] [--repeat 5]``.
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
    args = parser.parse_args(argv)
    with scratch_dir(args.workdir) as work:
        results = [measure(int(n), args.repeat, work) for n in args.sizes.split(",")]
    doc = {"environment": environment(), "goal_s": GOAL_S, "results": results}
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
