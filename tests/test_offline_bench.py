"""``bench.offline`` runs end to end at a tiny size and reports what it promises.

Never a timed assertion: only the shape of its JSON document, and figures that follow from
the sizes (a delta medium is smaller than a full one), are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import offline
from tests.bench_run import run_json


def test_offline_bench_reports_export_and_update_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc: Any = run_json(
        capsys,
        offline.main,
        ["--json", "--size-mb", "2", "--repeat", "2", "--server", "thread",
         "--workdir", str(tmp_path)],
    )  # fmt: skip
    assert doc["benchmark"] == "offline" and doc["repeat"] == 2
    e, u = doc["export"], doc["update"]
    assert len(e["rounds"]) == len(u["rounds"]) == 2
    assert 0 < e["delta_bytes"] < e["full_bytes"]
    for r in e["rounds"]:
        assert r["delta"]["chunks_omitted"] > 0 and r["full"]["chunks_omitted"] == 0
        assert len(r["loadavg"]) == 3
    for r in u["rounds"]:  # each ratio from the same round
        assert r["ratio"] == round(r["medium"] / r["http"], 3)
    for spread in (e["full_seconds"], u["medium_seconds"], u["http_seconds"], u["ratio"]):
        assert spread["min"] <= spread["median"] <= spread["max"]
    assert doc["goal_met"] == (u["ratio"]["median"] <= doc["goal"])
