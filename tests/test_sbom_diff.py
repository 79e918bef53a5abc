"""ota.sbom: diff of two releases' SBOMs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ota.sbom import FieldChange, SbomError, build_mlbom, diff_sboms, render_diff
from tests.onnx_models import write_mlp


def _release(
    root: Path, version: str, *, out_features: int, seed: int, runtime: str, extra: bool = False
) -> bytes:
    """Build the SBOM of a bundle laid out under ``root``."""
    model = write_mlp(
        root / "model" / "model.onnx", seed=seed, external_data=True, out_features=out_features
    )
    paths = [model, model.with_name("model.onnx.data")]
    if extra:
        (root / "labels.txt").write_text("person\ncar\n")
        paths.append(root / "labels.txt")
    files = {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_size,
        )
        for p in paths
    }
    return build_mlbom(
        name="detector",
        version=version,
        model_path=model,
        files=files,
        runtime_range=">=1.20,<2",
        runtime_version=runtime,
    )


@pytest.fixture
def releases(tmp_path: Path) -> tuple[bytes, bytes]:
    old = _release(tmp_path / "a", "1.0.0", out_features=4, seed=0, runtime="1.20.1")
    new = _release(tmp_path / "b", "1.1.0", out_features=5, seed=1, runtime="1.31.1", extra=True)
    return old, new


def test_diff_of_two_releases(releases: tuple[bytes, bytes]) -> None:
    diff = diff_sboms(*releases)
    assert (diff.old, diff.new) == ("detector@1.0.0", "detector@1.1.0")
    assert [c.name for c in diff.added] == ["labels.txt"]
    assert diff.removed == ()
    changed = {c.name: {f.field: (f.old, f.new) for f in c.changes} for c in diff.changed}
    assert changed["onnxruntime"]["version"] == ("1.20.1", "1.31.1")
    assert changed["onnxruntime"]["purl"] == (
        "pkg:pypi/onnxruntime@1.20.1",
        "pkg:pypi/onnxruntime@1.31.1",
    )
    weights = changed["model/model.onnx.data"]
    assert set(weights) == {"hash SHA-256", "property edge-ota:file:size"}
    assert weights["hash SHA-256"][0] != weights["hash SHA-256"][1]
    assert changed["detector"]["version"] == ("1.0.0", "1.1.0")
    card = {f.field: f for f in diff.model_card}
    assert card["output y shape"] == FieldChange("output y shape", "[N,4]", "[N,5]")
    assert "input x shape" not in card
    assert card["parameters"].old == str(8 * 16 + 16 + 16 * 16 + 16 + 16 * 4 + 4)
    assert card["parameters"].new == str(8 * 16 + 16 + 16 * 16 + 16 + 16 * 5 + 5)
    assert json.loads(json.dumps(diff.to_dict()))["model_card"]


def test_render_diff_is_human_readable(releases: tuple[bytes, bytes]) -> None:
    text = render_diff(diff_sboms(*releases))
    lines = text.splitlines()
    assert lines[0] == "SBOM diff detector@1.0.0 -> detector@1.1.0"
    assert "  + file labels.txt sha256:" in text
    assert "      version: 1.20.1 -> 1.31.1" in lines
    assert "  ~ output y shape: [N,4] -> [N,5]" in lines
    assert any(line.startswith("      hash SHA-256: ") and "…" in line for line in lines)


def test_identical_and_reversed(releases: tuple[bytes, bytes]) -> None:
    old, new = releases
    same = diff_sboms(old, old)
    assert same.empty
    assert render_diff(same).endswith("no differences")
    back = diff_sboms(new, old)
    assert [c.name for c in back.removed] == ["labels.txt"]
    assert not back.added


def test_diff_reports_dtype_opset_and_precision(tmp_path: Path) -> None:
    old = json.loads(_release(tmp_path / "a", "1.0.0", out_features=4, seed=0, runtime="1.20.1"))
    new = json.loads(json.dumps(old))
    props = new["metadata"]["component"]["modelCard"]["properties"]
    for p in props:
        if p["name"] == "edge-ota:onnx:input":
            p["value"] = json.dumps({"name": "x", "dtype": "float16", "shape": ["N", 8]})
        elif p["name"] == "edge-ota:onnx:opset":
            p["value"] = "ai.onnx=21"
        elif p["name"] == "edge-ota:onnx:precision":
            p["value"] = "fp16"
    props.append(
        {"name": "edge-ota:onnx:output", "value": '{"name":"z","dtype":"int64","shape":null}'}
    )
    diff = diff_sboms(json.dumps(old).encode(), json.dumps(new).encode())
    fields = {f.field: (f.old, f.new) for f in diff.model_card}
    assert fields == {
        "input x dtype": ("float32", "float16"),
        "opset ai.onnx": ("17", "21"),
        "precision": ("fp32", "fp16"),
        "output z": (None, "z: int64[?]"),
    }


def test_diff_refuses_invalid_sbom(releases: tuple[bytes, bytes]) -> None:
    with pytest.raises(SbomError):
        diff_sboms(releases[0], b"{}")
