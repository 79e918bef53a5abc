"""Per-report ingest cost with and without one telemetry summary (ADR 0015), in-process on
the fleet's own ``ingest`` (parse, lock the device, store, derive, fold), same run, same
database: the ratio is the figure; absolute times depend on the machine's load.

    python bench/telemetry_ingest_cost.py [DB_URL]      # default: a fresh SQLite file
"""

import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, ".")
from sqlalchemy.orm import Session

from ota.fleet import FleetConfig, migrate
from ota.fleet._db import make_engine
from ota.fleet._ingest import ingest, lock_device
from ota.fleet._models import Device
from ota.fleet._report import parse_report
from tests.test_rollout_health import Behaviour, make_summary

url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{tempfile.mkdtemp()}/f.db"
migrate(url)
cfg = FleetConfig(db_url=url)
eng = make_engine(cfg)
N = 100
with Session(eng) as s, s.begin():
    for k in range(N):
        s.add(
            Device(
                device_id=f"d{k}",
                credential_hash=f"{k:064d}",
                ring="ga",
                tier="t",
                enrolled_at=0,
                health="ok",
                events_total=0,
                dropped_total=0,
                rate_window_start=0.0,
                rate_count=0,
            )
        )
rng = np.random.default_rng(0)
summ = make_summary(rng, "1.0.0", Behaviour())
now = time.time()
summ = {**summ, "start": now - 300, "end": now - 1}


def doc(dev: str, seq: int, tel: bool) -> dict[str, Any]:
    evs = [
        {"seq": seq, "time": now, "kind": "checked", "model": "det", "version": "1.0.0", "data": {}}
    ]
    if tel:
        evs.append(
            {
                "seq": seq + 1,
                "time": now,
                "kind": "telemetry",
                "model": "det",
                "version": "1.0.0",
                "data": {"summary": summ},
            }
        )
    return {
        "format": "edge-ota.report/1",
        "device": {
            "id": dev,
            "ring": "ga",
            "tier": "t",
            "arch": "x",
            "runtime_version": "1",
            "client_version": "0.1",
            "models": {"det": {"version": "1.0.0", "counter": 1}},
        },
        "queue": "q",
        "dropped": 0,
        "events": evs,
    }


res: dict[bool, list[float]] = {False: [], True: []}
seq = 1
for _ in range(6):
    for tel in (False, True):
        t0 = time.perf_counter()
        for k in range(N):
            r = parse_report(doc(f"d{k}", seq, tel), f"d{k}", cfg)
            with Session(eng) as s, s.begin():
                dev = lock_device(s, f"d{k}")
                assert dev is not None
                ingest(s, dev, r, time.time())
        res[tel].append((time.perf_counter() - t0) / N)
        seq += 2
a, b = statistics.median(res[False][1:]), statistics.median(res[True][1:])
print(
    f"{eng.dialect.name}: per report without telemetry {a * 1e3:.2f} ms, "
    f"with one summary {b * 1e3:.2f} ms, ratio {b / a:.2f}"
)
