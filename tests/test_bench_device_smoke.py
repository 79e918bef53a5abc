"""The device benchmarks run end to end at a tiny size and report what they promise.

Never a timed assertion: only the shape of each benchmark's JSON document is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import device_delta, device_large, device_poll, device_rss, device_update
from bench.device_update import UPDATE_PHASES
from tests import nginx
from tests.bench_run import run_json


def test_device_update_reports_both_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(
        capsys,
        device_update.main,
        ["--json", "--size-mb", "2", "--repeat", "2", "--no-smoke", "--server", "thread",
         "--workdir", str(tmp_path)],
    )  # fmt: skip
    assert doc["benchmark"] == "device_update" and doc["server"] == "thread"
    assert {
        "seconds",
        "cpu_seconds",
        "ratio_stock",
        "ratio_curl",
        "ratio_stock_work",
        "goal_stock_met",
        "goal_curl_met",
        "ours_phases_s",
        "rounds",
        "loadavg_before",
    } <= set(doc)
    rounds = doc["rounds"]
    assert isinstance(rounds, list) and len(rounds) == 2
    for r in rounds:  # every path in every round, each ratio from the same round
        assert r["ratio_stock"] == round(r["ours_s"] / r["stock_s"], 3)
        assert r["ratio_curl"] == round(r["ours_s"] / r["curl_s"], 3)
        assert len(r["loadavg"]) == 3
        assert r["stock_steps_s"]["download_target"] > 0
    for key in ("seconds", "cpu_seconds"):
        spread = doc[key]
        assert isinstance(spread, dict)
        assert set(spread) == {"ours", "stock", "curl"}
        for v in spread.values():
            assert v["min"] <= v["median"] <= v["max"]
    phases = doc["ours_phases_s"]
    assert isinstance(phases, dict)
    assert set(phases) == {*UPDATE_PHASES, "other"}


def test_device_delta_reports_bytes_against_binary_diff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(
        capsys,
        device_delta.main,
        ["--json", "--sizes", "2", "--scenarios", "finetune10", "--workdir", str(tmp_path)],
    )
    assert doc["benchmark"] == "device_delta"
    rows = doc["scenarios"]
    assert isinstance(rows, list) and len(rows) == 1
    row: dict[str, Any] = rows[0]
    assert row["scenario"] == "finetune10"
    assert {"ours_bytes", "best_baseline_bytes", "ours_over_best", "baselines", "delta",
            "publish_delta", "loadavg"} <= set(row)
    assert set(row["baselines"]) == {"zstd", "xdelta3"}
    assert 0 < row["ours_over_new_size"] < 1  # a fine-tune never refetches everything
    assert isinstance(doc["goal_met"], bool)


def test_device_rss_reports_child_peaks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys, device_rss.main, ["--json", "--sizes-mb", "2", "--workdir", str(tmp_path)]
    )
    assert doc["benchmark"] == "device_rss"
    base = doc["imports_only"]
    assert isinstance(base, dict)
    assert base["peak_mb"] > 0
    points = doc["points"]
    assert isinstance(points, list)
    assert [p["size_mb"] for p in points] == [2]
    for p in points:
        assert {"peak_mb", "over_imports_mb", "ratio_to_smallest", "goal_met"} <= set(p)
        assert p["child"]["status"] in ("updated", "pending_confirmation")


def test_device_large_installs_with_the_real_smoke_and_reports_both_peaks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    doc = run_json(
        capsys,
        device_large.main,
        ["--json", "--sizes-mb", "2", "--server", "thread", "--workdir", str(tmp_path)],
    )
    assert doc["benchmark"] == "device_large"
    points = doc["points"]
    assert isinstance(points, list) and len(points) == 1
    p = points[0]
    assert p["exit_code"] == 0 and p["status"] == "updated", p["failure"]
    assert 0 < p["updater_peak_mib"] < p["smoke_peak_mib"]  # two processes, measured apart
    assert p["smoke_mem_limit_mib"] > p["model_bytes"] / 2**20
    env = doc["environment"]
    assert isinstance(env, dict) and len(env["loadavg"]) == 3
    assert isinstance(doc["goal_met"], bool)
    assert "OTA_BENCH_SERVER" not in os.environ


def test_device_poll_counts_at_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(capsys, device_poll.main, ["--json", "--polls", "1", "--workdir", str(tmp_path)])
    assert doc["benchmark"] == "device_poll"
    assert {
        "requests",
        "body_bytes",
        "header_bytes",
        "polls",
        "goal_met",
        "stock_refresh_up_to_date",
    } <= set(doc)
    polls = doc["polls"]
    assert isinstance(polls, list)
    assert len(polls) == 1
    assert polls[0]["requests"] == len(polls[0]["hits"]) > 0
    wire = doc["nginx_wire"]
    if nginx.available():
        assert isinstance(wire, dict)
        [last] = wire["polls"]
        assert last["total"] == wire["request_bytes"] + wire["response_bytes"] > 0
        assert any(h.startswith("HTTP/1.1 404") for h in wire["response_heads"])


@pytest.mark.skipif(not nginx.available(), reason="nginx is not installed")
def test_device_update_through_nginx_leaves_no_server_setting_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    doc = run_json(
        capsys,
        device_update.main,
        ["--json", "--size-mb", "2", "--repeat", "1", "--no-smoke", "--workdir", str(tmp_path)],
    )
    assert doc["server"] == "nginx"  # the default where nginx is installed
    seconds = doc["seconds"]
    assert isinstance(seconds, dict)
    for key in ("ours", "stock", "curl"):
        assert seconds[key]["median"] > 0, key
    assert "OTA_BENCH_SERVER" not in os.environ
