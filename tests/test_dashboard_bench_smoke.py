"""bench/dashboard_pages.py runs end to end at a tiny size and reports every page it promises,
each rendered without error. Never a timed assertion: only the document's shape is checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import dashboard_pages
from tests.bench_run import run_json


def test_the_dashboard_benchmark_renders_every_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("OTA_PROJECT", "OTA_DASHBOARD_KEY_FILE"):  # the benchmark sets them
        monkeypatch.setenv(var, "")
    argv = ["--json", "--sizes", "60", "--events-per-device", "3", "--repeat", "1"]
    doc: Any = run_json(
        capsys,
        dashboard_pages.main,
        [*argv, "--workdir", str(tmp_path)],
    )
    assert doc["benchmark"] == "dashboard_pages" and doc["goal_ms"] == 300.0
    (r,) = doc["results"]
    assert r["devices"] == 60 and r["events"] == 180 and r["errors"] == []
    assert set(r["pages"]) >= {"fleet", "devices", "device", "rollouts", "rollout"}
    for t in r["pages"].values():
        assert t["best_ms"] <= t["median_ms"] <= t["max_ms"] and "server_ms" in t
