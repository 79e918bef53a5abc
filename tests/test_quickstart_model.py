"""The quickstart's ``model.onnx`` comes from ``scripts/make_model.py``: it must stay a model
that ``ota publish`` accepts (static checks, golden run) and be reproducible for a seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ota.repository import PublishRequest, publish
from tests.repo_helpers import make_project

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_model.py"


def _make(out: Path, *args: str) -> bytes:
    subprocess.run([sys.executable, str(_SCRIPT), str(out), *args], check=True,
                   capture_output=True)  # fmt: skip
    return out.read_bytes()


def test_make_model_publishes_and_is_reproducible(tmp_path: Path) -> None:
    first = _make(tmp_path / "model.onnx")
    assert _make(tmp_path / "again.onnx") == first
    assert _make(tmp_path / "model-1.1.onnx", "--seed", "1") != first
    project = make_project(tmp_path, bins=4)
    for version, name in (("1.0.0", "model.onnx"), ("1.1.0", "model-1.1.onnx")):
        req = PublishRequest(source=tmp_path / name, name="detector", version=version)
        assert publish(project, req).counter == int(version[2]) + 1
