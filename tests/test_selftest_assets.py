"""The runtime self-test assets in ``client/_selftest`` are what ``scripts/make_selftest.py``
builds (no drift), they ship in the wheel, and the current onnxruntime passes them."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from ota.client._install import _SELFTEST_DIR, _SELFTEST_SPEC, default_smoke

ROOT = Path(__file__).resolve().parents[1]


def _builder() -> object:
    path = ROOT / "scripts" / "make_selftest.py"
    spec = importlib.util.spec_from_file_location("make_selftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_assets_are_reproducible(tmp_path: Path) -> None:
    _builder().build(tmp_path)  # type: ignore[attr-defined]
    names = sorted(p.name for p in _SELFTEST_DIR.iterdir())
    assert names == ["golden.npz", "inputs.npz", "model.onnx"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (_SELFTEST_DIR / name).read_bytes(), name


def test_assets_are_package_data() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["ota.client"]
    for p in _SELFTEST_DIR.iterdir():
        assert any(p.match(pat.split("/")[-1]) for pat in patterns), p.name


def test_system_runtime_passes_the_self_test() -> None:
    report = default_smoke(_SELFTEST_DIR / "model.onnx", _SELFTEST_DIR, _SELFTEST_SPEC,
                           tier="default")
    doc = report.to_dict()
    assert doc["runs"] == 3 and doc["max_abs_err"] < 1e-5
