"""False halts and detection of the rollout health gates over simulated stages (ADR 0015).

    python bench/health_gates_sim.py SCENARIO STAGES [DEVICES_PER_TIER] [PASS_CONFIDENCE] [-v]

SCENARIO: good, p95 (+30 % on tier b), drift (+0.5 sigma outputs), crash (70 % of tier a's
new devices crash). Each stage: a fresh SQLite database, two tiers, N devices per tier on each
release, one summary per device made with the client's own counters, folded by the fleet's
``absorb``, judged by ``evaluate_health``. Prints the verdicts and which gates did not pass.
"""

import sys
import tempfile
import time

import numpy as np
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

sys.path.insert(0, ".")
from ota.fleet import migrate
from ota.fleet._models import Device, DeviceModel
from ota.fleet._report import ReportEvent
from ota.fleet._telemetry import absorb
from ota.rollout._health import evaluate_health
from ota.rollout._verdict import Action, GateResult, GateStatus, combine
from tests.test_rollout_health import (
    MODEL,
    NEW,
    OLD,
    RING,
    T0,
    Behaviour,
    Ctx,
    make_summary,
    reference,
)


def run(
    seed: int, scenario: str, per_tier: int = 8, tiers: tuple[str, ...] = ("a", "b")
) -> tuple[list[GateResult], float]:
    rng = np.random.default_rng(seed)
    d = tempfile.mkdtemp()
    url = f"sqlite:///{d}/f.db"
    migrate(url)
    e = create_engine(url)
    with Session(e) as s, s.begin():
        k = 0
        for tier in tiers:
            for version in (OLD, NEW):
                for _ in range(per_tier):
                    k += 1
                    # realistic noise: device speed varies ±20 %, traffic 100-1000/interval
                    b = Behaviour(
                        latency_s=0.02 * rng.lognormal(0, 0.2),
                        spread=rng.uniform(0.15, 0.4),
                        error_p=rng.uniform(0, 0.004),
                        inferences=int(rng.integers(100, 1000)),
                        crashes=int(rng.random() < 0.05),
                        out_sd=rng.uniform(0.9, 1.1),
                    )
                    if version == NEW and scenario == "p95" and tier == "b":
                        b.latency_s *= 1.3
                    if version == NEW and scenario == "drift":
                        b.out_mean += 0.5
                    if version == NEW and scenario == "crash" and tier == "a":
                        b.crashes += int(rng.integers(1, 4)) if rng.random() < 0.7 else 0
                    dev = Device(
                        device_id=f"d{k}",
                        credential_hash=f"{k:064d}",
                        ring=RING,
                        tier=tier,
                        enrolled_at=T0,
                        health="ok",
                        events_total=0,
                        dropped_total=0,
                        rate_window_start=0.0,
                        rate_count=0,
                    )
                    s.add(dev)
                    s.flush()
                    s.add(
                        DeviceModel(
                            device_pk=dev.id,
                            model=MODEL,
                            version=version,
                            counter=1,
                            updated_at=T0,
                            ring=RING,
                            tier=tier,
                            active=True,
                        )
                    )
                    s.flush()
                    evs = [
                        ReportEvent(
                            1,
                            T0,
                            "telemetry",
                            MODEL,
                            version,
                            {"summary": make_summary(rng, version, b)},
                        )
                    ]
                    absorb(s, dev, {MODEL: (version, 1)}, evs, T0)
    with Session(e) as s:
        t = time.perf_counter()
        res = evaluate_health(s, Ctx(), TH, reference=reference())
        dt = time.perf_counter() - t
    e.dispose()
    return res, dt


TH = (
    {"pass_confidence": float(sys.argv[4])}
    if len(sys.argv) > 4 and sys.argv[4][0].isdigit()
    else {}
)
scenario = sys.argv[1]
n = int(sys.argv[2])
PT = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 8
acts: dict[str, int] = {}
times: list[float] = []
failed_gates: dict[tuple[str, str, str], int] = {}
for seed in range(n):
    res, dt = run(seed, scenario, per_tier=PT)
    times.append(dt)
    a = combine(res, Action.PAUSE)
    acts[a.value] = acts.get(a.value, 0) + 1
    for r in res:
        if r.status is not GateStatus.PASS and (r.status is GateStatus.FAIL or "-v" in sys.argv):
            failed_gates[(r.gate, r.tier, r.status.value)] = (
                failed_gates.get((r.gate, r.tier, r.status.value), 0) + 1
            )
print(scenario, n, acts, "median eval s", round(float(np.median(times)), 3))
print(" fails by gate:", dict(sorted(failed_gates.items())))
