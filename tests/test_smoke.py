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
    memory_limit_mb,
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


def test_peak_memory_is_the_childs_own_not_its_parents(
    bundle: tuple[Path, Path, SmokeSpec],
) -> None:
    """Linux carries a forking parent's RSS high-water mark across exec into ``ru_maxrss``:
    a smoke child forked from a big process (an updater, a test runner) reported the parent's
    peak as the model's, and could fail a tier budget for memory the model never used."""
    root, model, spec = bundle
    small = run_smoke(model, root, spec, tier="default")
    assert isinstance(small, SmokeReport)
    ballast = bytearray((int(small.peak_mem_mb) + 600) * 1024 * 1024)
    for i in range(0, len(ballast), 4096):  # touch every page: resident in this process
        ballast[i] = 1
    try:
        report = run_smoke(model, root, spec, tier="default")
    finally:
        del ballast
    assert isinstance(report, SmokeReport)
    assert report.peak_mem_mb < small.peak_mem_mb + 300, (small.peak_mem_mb, report.peak_mem_mb)


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


def test_memory_limit_is_derived_from_model_size_and_budget() -> None:
    limits = SmokeLimits(threads=2)
    reserve = limits.base_mem_mb + limits.mem_margin_mb + 2 * limits.thread_mem_mb
    mb = 1024 * 1024
    # No budget: the model file costs model_as_factor x its size (parse slack), external data
    # external_as_factor x (mapped + a weight's packed copy, issue 13), the smoke files twice.
    assert memory_limit_mb(100 * mb, 0, 0, limits=limits) == (reserve + 300, "model")
    assert memory_limit_mb(1024 * mb, 0, 0, limits=limits) == (reserve + 3072, "model")
    assert memory_limit_mb(mb, 4096 * mb, 5 * mb, limits=limits) == (
        reserve + 3 + 2 * 4096 + 10,
        "model",
    )
    # A tier budget replaces the model's allowance, up or down; the parse slack stays.
    assert memory_limit_mb(100 * mb, 0, 5 * mb, limits=limits, budget_mb=1000.0) == (
        reserve + 200 + 1000,
        "budget",
    )
    assert memory_limit_mb(100 * mb, 0, 0, limits=limits, budget_mb=1.0) == (
        reserve + 200 + 1,
        "budget",
    )
    # An explicit limit overrides everything.
    fixed = SmokeLimits(mem_limit_mb=777)
    assert memory_limit_mb(10**10, 10**10, 0, limits=fixed, budget_mb=5.0) == (777, "override")


def test_the_child_runs_under_the_derived_limit(bundle: tuple[Path, Path, SmokeSpec]) -> None:
    root, model, spec = bundle
    smoke = (root / spec.inputs).stat().st_size + (root / spec.golden).stat().st_size
    plain = SmokeSpec(inputs=spec.inputs, golden=spec.golden, runs=1)
    want, _ = memory_limit_mb(model.stat().st_size, 0, smoke)
    assert run_smoke(model, root, plain, tier="cam-v1").mem_limit_mb == want
    # A larger model file gets a larger limit: nothing is a constant.
    (model.parent / "model.onnx.data").write_bytes(b"\0" * (8 * 1024 * 1024))
    bigger, _ = memory_limit_mb(model.stat().st_size, 8 * 1024 * 1024, smoke)
    assert bigger == want + 2 * 8  # mapped, and a weight's packed copy beside its mapping
    assert run_smoke(model, root, plain, tier="cam-v1").mem_limit_mb == bigger
    budgeted = SmokeSpec(
        inputs=spec.inputs,
        golden=spec.golden,
        runs=1,
        budgets={"cam-v1": Budget(peak_mem_mb=900.0)},
    )
    want_b, source = memory_limit_mb(  # the external data's slack stays under a budget
        model.stat().st_size, 8 * 1024 * 1024, smoke, budget_mb=900.0
    )
    assert source == "budget"
    assert run_smoke(model, root, budgeted, tier="cam-v1").mem_limit_mb == want_b


def test_a_tier_budget_can_allow_what_the_model_size_alone_does_not(tmp_path: Path) -> None:
    """A tiny model that allocates 512 MiB at run time: over the limit derived from its size,
    within the limit of a tier whose budget allows it; and a budget far too small for it
    stops it as ``memory_budget``."""
    model = save(bad_models.huge_alloc(2**27), tmp_path / "model" / "model.onnx")
    _write(tmp_path, SMOKE_INPUTS_FILE, {"x": np.ones(1, np.float32)})
    _write(tmp_path, SMOKE_GOLDEN_FILE, {"y": np.array(2.0**27, np.float32)})
    limits = SmokeLimits(threads=1, mem_margin_mb=64)
    err = _fails(child.MEMORY, model, tmp_path, SmokeSpec(runs=1), limits=limits)
    assert err.report["mem_limit_from"] == "model"
    roomy = SmokeSpec(runs=1, budgets={"cam-v1": Budget(peak_mem_mb=1200.0)})
    report = run_smoke(model, tmp_path, roomy, tier="cam-v1", limits=limits)
    assert report.peak_mem_mb > 512
    tight = SmokeSpec(runs=1, budgets={"cam-v1": Budget(peak_mem_mb=50.0)})
    err = _fails(child.MEMORY_BUDGET, model, tmp_path, tight, limits=limits)
    assert err.report["mem_limit_from"] == "budget"
    assert "cam-v1 budget" in str(err)


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


# -- the model's skeleton (ADR 0008): initializers read in place from the model file ---------


def _session(model: Path | bytes, folder: Path | None = None) -> Any:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(folder)
        )
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def test_skeleton_points_at_the_initializers_own_bytes_and_computes_the_same(
    tmp_path: Path,
) -> None:
    import onnx

    model = write_mlp(tmp_path / "model.onnx", in_features=200, hidden=300, out_features=7)
    skel = child.skeleton(str(model))
    assert skel is not None and len(skel) < 16384 < model.stat().st_size // 10
    original = onnx.load(str(model))
    parsed = onnx.ModelProto.FromString(skel)
    data = model.read_bytes()
    big = 0
    for before, after in zip(original.graph.initializer, parsed.graph.initializer, strict=True):
        assert before.name == after.name and list(before.dims) == list(after.dims)
        if len(before.raw_data) < 64 * 1024:
            assert after.raw_data == before.raw_data  # small ones stay inline
            continue
        big += 1
        ext = {e.key: e.value for e in after.external_data}
        assert after.data_location == onnx.TensorProto.EXTERNAL and not after.raw_data
        assert ext["location"] == "model.onnx"
        start, length = int(ext["offset"]), int(ext["length"])
        assert data[start : start + length] == before.raw_data
    assert big >= 2
    assert list(parsed.graph.node) == list(original.graph.node)
    x = np.random.default_rng(3).standard_normal((5, 200)).astype(np.float32)
    want = _session(model).run(None, {"x": x})[0]
    got = _session(skel, tmp_path).run(None, {"x": x})[0]
    assert np.array_equal(got, want)


def test_skeleton_declines_what_it_cannot_walk(tmp_path: Path) -> None:
    small = write_mlp(tmp_path / "small" / "model.onnx")  # every initializer under 64 KiB
    assert child.skeleton(str(small)) is None
    external = write_mlp(tmp_path / "ext" / "model.onnx", in_features=200, hidden=300,
                         external_data=True)  # fmt: skip
    assert child.skeleton(str(external)) is None  # already external: nothing to do
    big = write_mlp(tmp_path / "big" / "model.onnx", in_features=200, hidden=300)
    data = big.read_bytes()
    for name, payload in {
        "truncated": data[: len(data) // 2],  # a length runs past the end
        "garbage": b"\xff" * 64,  # a varint that never ends
        "group": b"\x0b" + data,  # wire type 3 (a group) at the top level
        "two_graphs": data + data,  # protobuf would merge them: not ours to decide
        "empty": b"",
    }.items():
        path = tmp_path / name / "model.onnx"
        path.parent.mkdir()
        path.write_bytes(payload)
        assert child.skeleton(str(path)) is None, name
    assert child.skeleton(str(tmp_path / "missing.onnx")) is None
    # Most of the bytes outside initializers (a large Constant node): no skeleton either.
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(big))
    const = np.ones((1, 300), np.float32).repeat(2000, axis=0)  # 2.4 MB in the graph's nodes
    model.graph.node.append(
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(const, "c"))
    )
    heavy = save(model, tmp_path / "heavy" / "model.onnx")
    assert child.skeleton(str(heavy)) is None
    assert child.skeleton(str(big)) is not None


def test_smoke_through_the_skeleton_matches_golden_outputs(tmp_path: Path) -> None:
    """Golden outputs computed in-process from the file (onnxruntime's defaults); the sandboxed
    child loads the skeleton and must reproduce them within the default tolerances."""
    root = tmp_path / "bundle"
    model = write_mlp(root / "model" / "model.onnx", in_features=200, hidden=300, layers=3)
    assert child.skeleton(str(model)) is not None
    spec = make_smoke_files(model, root, batch=2)
    report = run_smoke(model, root, spec, tier="cam-v1")
    assert report.runs == spec.runs
    assert report.max_abs_err == 0.0  # the same bytes, the same kernels: bit-identical


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
