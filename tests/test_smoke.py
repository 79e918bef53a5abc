"""Sandboxed smoke inference on the device side, with real onnxruntime in a real subprocess."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

from ota.bundle import SMOKE_GOLDEN_FILE, SMOKE_INPUTS_FILE, Budget, SmokeSpec
from ota.client import _smoke_child as child
from ota.client._smoke import (
    SmokeFailed,
    SmokeLimits,
    SmokeReport,
    _parse_result,
    measure,
    run_smoke,
)
from ota.errors import SmokeError
from ota.repository._golden import make_smoke_files, npz_bytes
from tests import bad_models
from tests.onnx_models import save, write_mlp


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, Path, SmokeSpec]:
    """A bundle folder with a small MLP and its smoke files."""
    root = tmp_path / "bundle"
    model = write_mlp(root / "model" / "model.onnx")
    spec = make_smoke_files(model, root, batch=2, budgets={"*": Budget(1000.0, 2000.0)})
    return root, model, spec


def _write(root: Path, rel: str, arrays: dict[str, Any]) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(npz_bytes(arrays))


def _fails(reason: str, model: Path, root: Path, spec: SmokeSpec, **kw: Any) -> SmokeFailed:
    kw.setdefault("tier", "cam-v1")
    with pytest.raises(SmokeFailed) as info:
        run_smoke(model, root, spec, **kw)
    err = info.value
    assert isinstance(err, SmokeError)
    assert err.reason == reason, err.report
    assert err.report["reason"] == reason
    assert reason in str(err)
    assert "\n" not in str(err)
    return err


def _golden(root: Path) -> dict[str, Any]:
    with np.load(root / SMOKE_GOLDEN_FILE, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_pass_reports_figures(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, spec = bundle
    report = run_smoke(model, root, spec, tier="cam-v1")
    assert isinstance(report, SmokeReport)
    assert report.runs == spec.runs == 5
    assert report.max_abs_err is not None
    assert report.max_abs_err <= spec.atol
    assert 0.0 < report.latency_ms_p95 < 1000.0
    assert 10.0 < report.peak_mem_mb < 2000.0
    assert report.wall_ms > report.load_ms > 0.0
    assert report.runtime_version == onnxruntime.__version__
    assert report.tier == "cam-v1"
    assert json.dumps(report.to_dict())


def test_golden_mismatch(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, spec = bundle
    golden = _golden(root)
    golden["y"] = golden["y"] + np.float32(0.5)
    _write(root, SMOKE_GOLDEN_FILE, golden)
    err = _fails(child.GOLDEN_MISMATCH, model, root, spec)
    assert err.report["max_abs_err"] == pytest.approx(0.5, rel=1e-3)
    assert "max abs err" in str(err)


def test_nan_output_is_a_mismatch(tmp_path: Path) -> None:
    model = save(bad_models.nan_output(), tmp_path / "model" / "model.onnx")
    _write(tmp_path, SMOKE_INPUTS_FILE, {"x": np.ones(2, np.float32)})
    _write(tmp_path, SMOKE_GOLDEN_FILE, {"y": np.zeros(2, np.float32)})
    err = _fails(child.GOLDEN_MISMATCH, model, tmp_path, SmokeSpec())
    assert "NaN" in str(err)


def test_output_shape_change_is_a_mismatch(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, spec = bundle
    golden = _golden(root)
    _write(root, SMOKE_GOLDEN_FILE, {"y": golden["y"][:1]})
    _fails(child.GOLDEN_MISMATCH, model, root, spec)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_model_that_fails_to_load_is_a_crash(
    bundle: tuple[Path, Path, SmokeSpec], damage: str
) -> None:
    root, model, spec = bundle
    data = model.read_bytes()
    model.write_bytes(b"\x13garbage" * 64 if damage == "garbage" else data[: len(data) // 3])
    err = _fails(child.CRASH, model, root, spec)
    assert "load" in str(err)


def test_memory_exhaustion_is_contained(tmp_path: Path) -> None:
    model = save(bad_models.huge_alloc(2**29), tmp_path / "model" / "model.onnx")  # 2 GiB
    _write(tmp_path, SMOKE_INPUTS_FILE, {"x": np.ones(1, np.float32)})
    _write(tmp_path, SMOKE_GOLDEN_FILE, {"y": np.array(2.0**29, np.float32)})
    err = _fails(child.MEMORY, model, tmp_path, SmokeSpec(), limits=SmokeLimits(mem_margin_mb=64))
    assert err.report["mem_limit_mb"] < 500
    assert err.report["peak_mem_mb"] < 500


def test_latency_budget(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, _ = bundle
    tight = SmokeSpec(runs=3, budgets={"cam-v1": Budget(latency_ms_p95=0.001)})
    err = _fails(child.LATENCY_BUDGET, model, root, tight)
    assert err.report["latency_ms_p95"] > 0.001
    assert "cam-v1 budget" in str(err)
    # Another tier falls back to "*" or to no budget at all.
    assert run_smoke(model, root, tight, tier="gateway").runs == 3


def test_memory_budget(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, _ = bundle
    tight = SmokeSpec(runs=1, budgets={"*": Budget(peak_mem_mb=1.0)})
    err = _fails(child.MEMORY_BUDGET, model, root, tight)
    assert err.report["peak_mem_mb"] > 1.0


def test_timeout_kills_the_child(tmp_path: Path) -> None:
    model = save(bad_models.endless_loop(), tmp_path / "model" / "model.onnx")
    _write(tmp_path, SMOKE_INPUTS_FILE, {"x": np.ones(1, np.float32)})
    _write(tmp_path, SMOKE_GOLDEN_FILE, {"y": np.ones(1, np.float32)})
    err = _fails(child.TIMEOUT, model, tmp_path, SmokeSpec(), limits=SmokeLimits(timeout_s=2))
    assert 2000.0 <= err.report["wall_ms"] < 10_000.0


@pytest.mark.parametrize(
    ("rel", "arrays", "match"),
    [
        (SMOKE_INPUTS_FILE, {"z": np.zeros((2, 8), np.float32)}, "input names differ"),
        (SMOKE_INPUTS_FILE, {"x": np.zeros((2, 8), np.float64)}, "float64"),
        (SMOKE_INPUTS_FILE, {"x": np.zeros((2, 8, 1), np.float32)}, "rank"),
        (SMOKE_INPUTS_FILE, {"x": np.zeros((2, 7), np.float32)}, "axis 1"),
        (SMOKE_GOLDEN_FILE, {"out": np.zeros((2, 4), np.float32)}, "output names differ"),
        (SMOKE_GOLDEN_FILE, {"y": np.zeros((2, 4), np.int64)}, "int64"),
    ],
    ids=["input-name", "input-dtype", "input-rank", "input-dim", "output-name", "output-dtype"],
)
def test_signature_mismatch(
    bundle: tuple[Path, Path, SmokeSpec], rel: str, arrays: dict[str, Any], match: str
) -> None:
    root, model, spec = bundle
    _write(root, rel, arrays)
    err = _fails(child.SIGNATURE_MISMATCH, model, root, spec)
    assert match in str(err)


def test_pickled_smoke_file_is_refused(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, spec = bundle
    np.savez(root / SMOKE_INPUTS_FILE, x=np.array([None], dtype=object))
    _fails(child.BAD_FILES, model, root, spec)


def test_lying_npy_header_is_refused(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    """A header claiming 32 GB over a few bytes of data is refused before any allocation."""
    root, model, spec = bundle
    member = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 8)}
    np.lib.format.write_array_header_1_0(member, header)
    member.write(b"\0" * 64)
    with zipfile.ZipFile(root / SMOKE_INPUTS_FILE, "w") as archive:
        archive.writestr("x.npy", member.getvalue())
    err = _fails(child.BAD_FILES, model, root, spec)
    assert "bad header" in str(err)
    assert err.report["peak_mem_mb"] < 500


def test_missing_smoke_file(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, spec = bundle
    (root / SMOKE_GOLDEN_FILE).unlink()
    _fails(child.BAD_FILES, model, root, spec)


def test_unsafe_smoke_path(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, _ = bundle
    _fails(child.BAD_FILES, model, root, SmokeSpec(inputs="../inputs.npz"))


def _runtime(tmp_path: Path, init: str) -> Path:
    folder = tmp_path / "runtime"
    (folder / "onnxruntime").mkdir(parents=True)
    (folder / "onnxruntime" / "__init__.py").write_text(init)
    return folder


def test_runtime_bundle_is_used(bundle: tuple[Path, Path, SmokeSpec], tmp_path: Path) -> None:
    root, model, spec = bundle
    runtime_bundle = tmp_path / "runtime-bundle"  # the layout of a staged runtime bundle
    shutil.copytree(Path(onnxruntime.__file__).parent, runtime_bundle / "runtime" / "onnxruntime")
    report = run_smoke(model, root, spec, tier="cam-v1", runtime_path=runtime_bundle)
    assert report.runtime_file.startswith(str(runtime_bundle.resolve() / "runtime" / "onnxruntime"))


def test_runtime_path_without_onnxruntime(
    bundle: tuple[Path, Path, SmokeSpec], tmp_path: Path
) -> None:
    root, model, spec = bundle
    (tmp_path / "empty").mkdir()
    _fails(child.RUNTIME_MISMATCH, model, root, spec, runtime_path=tmp_path / "empty")


def test_broken_runtime_is_a_crash(bundle: tuple[Path, Path, SmokeSpec], tmp_path: Path) -> None:
    root, model, spec = bundle
    runtime = _runtime(tmp_path, "raise ImportError('libonnxruntime.so: wrong ELF class')\n")
    err = _fails(child.CRASH, model, root, spec, runtime_path=runtime)
    assert "wrong ELF class" in str(err)


def test_segfaulting_runtime_is_a_crash(
    bundle: tuple[Path, Path, SmokeSpec], tmp_path: Path
) -> None:
    root, model, spec = bundle
    runtime = _runtime(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    err = _fails(child.CRASH, model, root, spec, runtime_path=runtime)
    assert "SIGSEGV" in str(err)
    assert err.report["returncode"] < 0


def test_stdout_noise_does_not_corrupt_the_result(
    bundle: tuple[Path, Path, SmokeSpec], tmp_path: Path
) -> None:
    root, model, spec = bundle
    runtime = _runtime(tmp_path, "print('hello from native code')\nraise ImportError('x')\n")
    err = _fails(child.CRASH, model, root, spec, runtime_path=runtime)
    assert "hello from native code" in err.report["stderr_tail"]


def test_cpu_limit(bundle: tuple[Path, Path, SmokeSpec], tmp_path: Path) -> None:
    root, model, spec = bundle
    runtime = _runtime(tmp_path, "while True:\n    pass\n")
    limits = SmokeLimits(timeout_s=20, cpu_s=1)
    _fails(child.CPU_LIMIT, model, root, spec, runtime_path=runtime, limits=limits)


def _line(**changes: Any) -> bytes:
    doc: dict[str, Any] = dict.fromkeys(child.RESULT_KEYS)
    doc.update(format=child.RESULT_FORMAT, reason="ok", message="", runs=1)
    doc.update(changes)
    return json.dumps(doc).encode() + b"\n"


def test_result_parser_is_strict() -> None:
    assert isinstance(_parse_result(_line(latency_ms_p95=1), 1000), dict)
    bad = [
        b"",
        _line()[:-1],
        _line() + _line(),
        _line().replace(b'"runs": 1', b'"runs": true'),
        _line(reason="great"),
        _line(format="other/1"),
        _line(latency_ms_p95=-1.0),
        _line(latency_ms_p95="fast"),
        _line(message=7),
        _line().replace(b'"runs": 1', b'"runs": 1, "extra": 1'),
        _line().replace(b'"max_abs_err": null', b'"max_abs_err": NaN'),
        b"not json\n",
    ]
    for data in bad:
        assert isinstance(_parse_result(data, 1000), str), data
    assert isinstance(_parse_result(_line(message="x" * 2000), 1000), str)


def test_client_smoke_imports_without_onnx() -> None:
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "import ota.client._smoke\n"
        "assert 'onnxruntime' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, timeout=60)


def test_relative_paths(
    bundle: tuple[Path, Path, SmokeSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, model, spec = bundle
    monkeypatch.chdir(tmp_path)
    rel_root = root.relative_to(tmp_path)
    report = run_smoke(model.relative_to(tmp_path), rel_root, spec, tier="cam-v1")
    assert report.runs == spec.runs


def test_measure_without_inputs_file(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, _ = bundle
    with pytest.raises(SmokeFailed) as info:
        measure(model, root / "absent.npz")
    assert info.value.reason == child.BAD_FILES


def test_shapes_check_reports_no_value_error(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    """Review (issue 12): under ``check: shapes`` values are not compared, yet the report
    said ``max_abs_err: 0.0`` (an exact match) even for golden values that are far off: the
    fleet record claimed a check that was never made. It is None (not measured) now, and the
    shapes check is still applied."""
    import dataclasses

    root, model, spec = bundle
    far = {k: v + 1000.0 for k, v in _golden(root).items()}
    _write(root, SMOKE_GOLDEN_FILE, far)
    shapes = dataclasses.replace(spec, check="shapes")
    report = run_smoke(model, root, shapes, tier="cam-v1")
    assert report.max_abs_err is None, report
    _write(root, SMOKE_GOLDEN_FILE, {k: v[:1] for k, v in far.items()})
    _fails(child.GOLDEN_MISMATCH, model, root, shapes)
