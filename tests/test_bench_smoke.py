"""The benchmarks run end to end at a tiny size and report what they promise.

Never a timed assertion: only the shape of each benchmark's JSON document is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import delta_publish, publish_speed, repo_growth
from bench._common import PUBLISH_PHASES
from tests.bench_run import run_json
from tests.nginx import binary as nginx_binary


def test_publish_speed_reports_ratios_on_every_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(
        capsys,
        publish_speed.main,
        ["--json", "--size-mb", "2", "--repeat", "1", "--storage", "file,s3,s3-proc",
         "--workdir", str(tmp_path)],
    )  # fmt: skip
    assert doc["benchmark"] == "publish_speed"
    results = doc["results"]
    assert isinstance(results, list)
    assert [r["storage"] for r in results] == ["file", "s3", "s3-proc"]
    for r in results:
        assert {"baseline_s", "publish_s", "ratio", "ratio_spread", "goal_met"} <= set(r)
        assert set(r["phases_s"]) == {*PUBLISH_PHASES, "other", "overlap"}
        assert r["upload"]["bytes_uploaded"] >= r["model_bytes"]
        assert r["ratio"] > 0
        # the peak RSS of each phase was sampled while it ran
        assert {"checks", "chunk_upload", "smoke_golden", "sbom"} <= set(r["phase_peak_rss_mb"])
        assert all(v > 0 for v in r["phase_peak_rss_mb"].values())
        assert len(r["rounds"][0]["loadavg"]) == 2
    # the fresh `ota publish` process against cp + openssl + sync, on the local folder only
    cli = results[0]["cli"]
    assert cli["baseline_s"] > 0 and cli["publish_s"] > 0 and cli["ratio"] > 0
    assert cli["vmhwm_mb"] > 20  # an interpreter with onnxruntime loaded, at the least
    assert cli["rss_goal_mb"] == pytest.approx(1.3 * results[0]["model_bytes"] / 2**20 + 200, 0.01)
    assert isinstance(cli["goal_met"], bool) and isinstance(cli["rss_goal_met"], bool)
    assert all("cli" not in r for r in results[1:])


def test_publish_speed_external_data_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(
        capsys,
        publish_speed.main,
        ["--json", "--size-mb", "2", "--repeat", "1", "--external", "--workdir", str(tmp_path)],
    )
    assert doc["external_data"] is True
    results = doc["results"]
    assert isinstance(results, list) and len(results) == 1
    r = results[0]
    assert isinstance(r, dict)
    assert (tmp_path / "model" / "model.onnx.data").stat().st_size > (
        (tmp_path / "model" / "model.onnx").stat().st_size
    )
    size = doc["model_bytes"]
    assert isinstance(size, int) and size > 2 * 2**20 * 0.9
    assert r["model_bytes"] == size
    assert r["upload"]["bytes_uploaded"] >= r["model_bytes"]
    assert r["cli"]["vmhwm_mb"] > 0


def test_delta_publish_reports_uploaded_fraction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(
        capsys,
        delta_publish.main,
        ["--json", "--size-mb", "2", "--fractions", "0.1,0.3", "--workdir", str(tmp_path)],
    )
    assert doc["benchmark"] == "delta_publish"
    deltas = doc["deltas"]
    assert isinstance(deltas, list)
    assert [d["fraction"] for d in deltas] == [0.1, 0.3]
    for d in deltas:
        assert {"bytes_uploaded", "uploaded_over_full", "publish_s", "time_over_full_publish"} <= (
            set(d)
        )
        # a fine-tune never re-uploads the whole model's chunks; the binary deltas from the two
        # previous releases come on top (at 2 MB they can add up to more than the file)
        # (ADR 0017: a new multi-chunk file is stored whole, as its file blob: apart here)
        chunk_bytes = d["bytes_uploaded"] - d["binary_deltas"]["bytes"] - d["file_blob_bytes"]
        assert 0 < chunk_bytes < doc["model_bytes"]
        assert d["file_blob_bytes"] == doc["model_bytes"]  # every byte written, and reported
    assert isinstance(doc["goal_met"], bool)


def test_repo_growth_reports_each_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys,
        repo_growth.main,
        [
            "--json",
            "--releases",
            "10,20",
            "--layouts",
            "models,bins-16",
            "--repeat",
            "1",
            "--batch",
            "4",
            "--workdir",
            str(tmp_path),
        ],
    )
    assert doc["benchmark"] == "repo_growth"
    series = doc["series"]
    assert isinstance(series, list)
    assert [s["layout"] for s in series] == ["models", "bins-16"]
    points = [p for s in series for p in s["points"]]
    assert [p["releases"] for p in points] == [10, 20, 10, 20]
    for p in points:
        assert {
            "publish_s",
            "publish_ratio",
            "refresh_s",
            "refresh_bytes",
            "refresh_requests",
            "refresh_bytes_ratio",
            "refresh_s_ratio",
        } <= set(p)
        assert p["refresh_bytes"] > 0
        if nginx_binary() is not None:  # device figures on the wire: gzip, idle poll unchanged
            assert 0 < p["device_after_other_wire"] < p["stock_after_other_wire"]
            assert 0 < p["device_idle_wire"] <= 1024
            for server in ("serve", "s3"):  # the same polls through ota serve and moto's S3
                for step in ("cold", "after_other", "idle", "after_new"):
                    assert p[f"{server}_device_{step}_wire"] > 0
            assert p["serve_device_idle_wire"] <= 1024  # ota serve trims headers as nginx does
