"""Cost per inference call of the telemetry API, and allocation growth (issue 9).

A device is set up for real (a small MLP published as 1.0.0, served over loopback HTTP,
installed with :func:`ota.client.update_once`), then :class:`ota.client.telemetry.Telemetry`
is opened on its state dir (no background flusher: a flush is once per interval, not per call).

Timing: ``--repeat`` rounds of ``--calls`` calls each, for every variant in the same run, in
turn (so noise hits them alike):

* ``baseline``: ``with Empty(): pass``, an empty context manager created per call;
* ``inference``: ``with rec.inference(model, version): pass``;
* ``record``: ``rec.record(model, version, 0.001)``;
* ``inference+outputs``: ``inference`` plus ``t.outputs(y)`` with a 1x8 float32 output counted
  into the release's 32 reference bins (numpy work: reported, not part of the 5 us goal).

Per variant the median, min and max of the per-call time over the rounds; the API's cost is
``median(variant) - median(baseline)`` and its ratio to the baseline.
Allocation: ``tracemalloc`` traced memory after a warm-up, then after ``--alloc-calls / 10``
and ``--alloc-calls`` further ``inference`` calls (and ``inference+outputs`` calls); growth is
the difference, which must not grow with the number of calls.
Goal: ``inference`` costs < 5 us per call over the baseline, and growth stays under 4 KiB from
1e5 to 1e6 calls.

Run: ``python -m bench.telemetry_cost [--json] [--calls N] [--repeat R] [--alloc-calls N]``.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import base_parser, emit, environment, log, ratio, scratch_dir, table
from bench.device_update import MODEL, Repo, init_dev, serve_counting, update

GOAL_US = 5.0
GOAL_GROWTH_BYTES = 4096
VERSION = "1.0.0"


class Empty:
    __slots__ = ()

    def __enter__(self) -> Empty:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _device(work: Path) -> Path:
    from tests.onnx_models import write_mlp

    repo = Repo.create(work / "repo-work")
    repo.publish(write_mlp(work / "m" / "model.onnx"), VERSION)
    with serve_counting(repo.root_dir) as (url, _):
        update(init_dev(work / "dev", url, repo.trusted_root))
    return work / "dev"


def _variants(rec: Any) -> dict[str, Callable[[int], None]]:
    y = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)

    def baseline(n: int) -> None:
        for _ in range(n):
            with Empty():
                pass

    def inference(n: int) -> None:
        for _ in range(n):
            with rec.inference(MODEL, VERSION):
                pass

    def record(n: int) -> None:
        for _ in range(n):
            rec.record(MODEL, VERSION, 0.001)

    def with_outputs(n: int) -> None:
        for _ in range(n):
            with rec.inference(MODEL, VERSION) as t:
                t.outputs(y)

    return {"baseline": baseline, "inference": inference, "record": record,
            "inference+outputs": with_outputs}  # fmt: skip


def _timing(variants: dict[str, Callable[[int], None]], calls: int, repeat: int) -> dict[str, Any]:
    per_call: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn(min(calls, 10_000))  # warm-up
    for _ in range(repeat):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(calls)
            per_call[name].append((time.perf_counter() - t0) / calls * 1e6)
    base = statistics.median(per_call["baseline"])
    out: dict[str, Any] = {}
    for name, xs in per_call.items():
        med = statistics.median(xs)
        out[name] = {"median_us": round(med, 3), "min_us": round(min(xs), 3),
                     "max_us": round(max(xs), 3), "over_baseline_us": round(med - base, 3),
                     "ratio": ratio(med, base)}  # fmt: skip
    return out


def _growth(fn: Callable[[int], None], calls: int) -> dict[str, int]:
    fn(10_000)
    tracemalloc.start()
    try:
        fn(1000)
        start = tracemalloc.get_traced_memory()[0]
        fn(max(1, calls // 10))
        tenth = tracemalloc.get_traced_memory()[0]
        fn(calls - max(1, calls // 10))
        end = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return {"calls": calls, "after_tenth_bytes": tenth - start, "after_all_bytes": end - start,
            "growth_tenth_to_all_bytes": end - tenth}  # fmt: skip


def run(calls: int, repeat: int, alloc_calls: int, work: Path) -> dict[str, Any]:
    from ota.client.telemetry import Telemetry

    log("setting up a device (publish, serve, update)")
    dev = _device(work)
    rec = Telemetry.open(dev, auto_flush=False)
    variants = _variants(rec)
    log(f"timing {len(variants)} variants: {repeat} x {calls} calls")
    timing = _timing(variants, calls, repeat)
    log(f"allocation growth over {alloc_calls} calls")
    growth = {k: _growth(variants[k], alloc_calls) for k in ("inference", "inference+outputs")}
    rec.close()
    cost = timing["inference"]["over_baseline_us"]
    max_growth = max(abs(g["growth_tenth_to_all_bytes"]) for g in growth.values())
    return {
        "benchmark": "telemetry_cost", "environment": environment(),
        "calls": calls, "repeat": repeat, "timing": timing, "allocation": growth,
        "goal_us": GOAL_US, "goal_growth_bytes": GOAL_GROWTH_BYTES,
        "goal_met": cost < GOAL_US and max_growth < GOAL_GROWTH_BYTES,
    }  # fmt: skip


def render(doc: dict[str, Any]) -> str:
    rows = [[k, v["median_us"], v["min_us"], v["max_us"], v["over_baseline_us"], v["ratio"]]
            for k, v in doc["timing"].items()]  # fmt: skip
    grows = [[k, g["calls"], g["after_tenth_bytes"], g["after_all_bytes"],
              g["growth_tenth_to_all_bytes"]] for k, g in doc["allocation"].items()]  # fmt: skip
    return "\n".join([
        table(f"per call, {doc['repeat']} x {doc['calls']} calls (us)",
              ["variant", "median", "min", "max", "over baseline", "ratio"], rows),
        table("tracemalloc (bytes)", ["variant", "calls", "after 1/10", "after all",
                                      "growth 1/10 -> all"], grows),
        f"goal (< {doc['goal_us']} us over baseline, growth < {doc['goal_growth_bytes']} B): "
        f"{'met' if doc['goal_met'] else 'NOT met'}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "telemetry_cost")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--alloc-calls", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    with scratch_dir(args.workdir) as work:
        doc = run(args.calls, args.repeat, args.alloc_calls, work)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
