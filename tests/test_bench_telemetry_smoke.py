"""The telemetry cost benchmark runs end to end at a tiny size and reports what it promises.

Never a timed assertion: only the shape of the JSON document is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import telemetry_cost
from tests.bench_run import run_json


def test_telemetry_cost_reports_per_call_figures_and_allocation_growth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--json", "--calls", "200", "--repeat", "2", "--alloc-calls", "2000"]
    doc = run_json(capsys, telemetry_cost.main, [*argv, "--workdir", str(tmp_path)])
    assert doc["benchmark"] == "telemetry_cost"
    timing = doc["timing"]
    assert isinstance(timing, dict)
    assert set(timing) == {"baseline", "inference", "record", "inference+outputs"}
    for v in timing.values():
        assert {"median_us", "min_us", "max_us", "over_baseline_us", "ratio"} <= set(v)
        assert 0 < v["min_us"] <= v["median_us"] <= v["max_us"]
    allocation = doc["allocation"]
    assert isinstance(allocation, dict) and set(allocation) == {"inference", "inference+outputs"}
    for g in allocation.values():
        assert g["calls"] == 2000 and "growth_tenth_to_all_bytes" in g
    assert isinstance(doc["goal_met"], bool)
