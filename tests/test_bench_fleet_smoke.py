"""The fleet benchmarks run end to end at a tiny size (SQLite only: quick) and report what they
promise. Never a timed assertion: only the shape of each JSON document is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fleet_ingest, fleet_query
from tests.bench_run import run_json


def test_fleet_ingest_reports_rates_and_where_the_cpu_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(
        capsys,
        fleet_ingest.main,
        [
            "--json",
            "--backends",
            "sqlite",
            "--seconds",
            "1",
            "--devices",
            "4",
            "--clients",
            "2",
            "--workers",
            "2",
            "--workdir",
            str(tmp_path),
        ],
    )
    assert doc["benchmark"] == "fleet_ingest"
    results = doc["results"]
    assert isinstance(results, list) and len(results) == 1
    r = results[0]
    assert r["backend"] == "sqlite" and r["events_per_report"] == 10
    for key in ("reports", "baseline_health"):
        assert r[key]["requests_ok"] > 0 and r[key]["per_s"] > 0
        assert set(r[key]["cpu_s"]) == {
            "service",
            "postgres",
            "load_generator",
            "machine",
            "machine_capacity",
        }
        assert r[key]["service_rss_mb"] > 0
    assert r["reports"]["events_per_s"] == pytest.approx(10 * r["reports"]["per_s"], rel=0.01)
    assert r["reports_over_baseline"] > 0


def test_fleet_query_reports_each_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys,
        fleet_query.main,
        [
            "--json",
            "--backends",
            "sqlite",
            "--sizes",
            "60,120",
            "--events-per-device",
            "3",
            "--repeat",
            "2",
            "--workdir",
            str(tmp_path),
        ],
    )
    assert doc["benchmark"] == "fleet_query"
    rows = doc["results"]
    assert isinstance(rows, list)
    assert [(r["devices"], r["events"]) for r in rows] == [(60, 180), (120, 360)]
    for r in rows:
        assert set(r["queries"]) == {
            "summary",
            "summary_recount",
            "devices_filtered",
            "devices_failing_page",
            "device_detail",
            "metrics_scrape",
        }
        for q in r["queries"].values():
            assert q["best_ms"] > 0 and q["max_ms"] >= q["median_ms"] >= q["best_ms"]
            assert isinstance(q["goal_met"], bool)
        assert r["service_rss_mb"]["after_queries"] > 0
