"""Publishing real third-party models (issue 12, items 11-13): smoke inputs the model accepts,
degenerate golden outputs refused, several reference sets, outputs that vary, the model card's
parameter count, and budgets checked on the publisher's own tier.

The models are silero-vad's and PaddleOCR's (via rapidocr-onnxruntime) as their PyPI wheels ship
them (:mod:`tests.real_models`); the device side is the real sandboxed smoke child.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ota.bundle import SMOKE_GOLDEN_FILE, Budget, SmokeSpec
from ota.client._smoke import SmokeFailed, run_smoke
from ota.errors import ExitCode, InputError
from ota.repository import PublishRequest, publish, releases
from ota.repository._auditlog import read_log
from ota.repository._golden import GoldenError, make_smoke_files, npz_bytes
from ota.repository._publish import OverBudget
from ota.sbom import model_card
from tests import http_faults
from tests.onnx_models import framed, noisy, save
from tests.real_models import ocr_model, silero_model
from tests.repo_helpers import make_project
from tests.test_updater import base  # noqa: F401 - the shared published world
from tests.updater_world import Base, World, current_version


def _load(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write_npz(path: Path, **arrays: Any) -> Path:
    path.write_bytes(npz_bytes(arrays))
    return path


# -- item 11: generated inputs a real model accepts, checked by the device's own smoke child --


@pytest.mark.parametrize(
    "model",
    [
        silero_model("silero_vad.onnx"),
        silero_model("silero_vad_16k_op15.onnx"),
        silero_model("silero_vad_op18_ifless.onnx"),
        ocr_model("ch_PP-OCRv4_det_infer.onnx"),
        ocr_model("ch_PP-OCRv4_rec_infer.onnx"),
    ],
    ids=lambda p: p.stem,
)
def test_generated_inputs_fit_real_models_and_pass_device_smoke(
    model: Path, tmp_path: Path
) -> None:
    # Before: symbolic dims were 1, so silero failed ("Pad reflect requires axis length >= 2")
    # and the OCR detector published an all-zero 1x3x1x1 golden output.
    spec = make_smoke_files(model, tmp_path)
    inputs = _load(tmp_path / spec.inputs)
    golden = _load(tmp_path / spec.golden)
    first = next(iter(inputs.values()))  # the audio or the image (signature order)
    assert all(d >= 2 for d in first.shape[1:]), first.shape
    assert any(a.size > 1 and np.ptp(a) > 1e-3 for a in golden.values())
    report = run_smoke(model, tmp_path, spec, tier="default")
    assert report.max_abs_err is not None and report.max_abs_err <= 1e-3


def test_silero_sample_rate_comes_from_the_graph(tmp_path: Path) -> None:
    # silero_vad.onnx runs 512-sample frames only when sr == 16000: Equal(sr, 16000) says so.
    spec = make_smoke_files(silero_model("silero_vad.onnx"), tmp_path)
    inputs = _load(tmp_path / spec.inputs)
    assert inputs["sr"].dtype == np.int64 and int(inputs["sr"]) == 16000
    assert inputs["state"].shape == (2, 1, 128)  # the state's free axis is the batch


def test_degenerate_golden_from_given_inputs_is_refused(tmp_path: Path) -> None:
    det = ocr_model("ch_PP-OCRv4_det_infer.onnx")
    tiny = _write_npz(tmp_path / "tiny.npz", x=np.ones((1, 3, 1, 1), np.float32))
    with pytest.raises(GoldenError, match="degenerate") as info:
        make_smoke_files(det, tmp_path / "b", inputs_npz=tiny)
    assert "--inputs" in (info.value.remedy or "")
    assert "--allow-degenerate-golden" in (info.value.remedy or "")
    assert not (tmp_path / "b" / SMOKE_GOLDEN_FILE).exists()
    accepted: list[str] = []
    make_smoke_files(det, tmp_path / "c", inputs_npz=tiny, allow_degenerate=True, accepted=accepted)
    assert accepted and "sigmoid_0.tmp_0" in accepted[0]


def test_a_model_that_rejects_every_guess_names_inputs(tmp_path: Path) -> None:
    model = save(framed(frame=21), tmp_path / "framed.onnx")
    with pytest.raises(GoldenError, match="rejects every generated input") as info:
        make_smoke_files(model, tmp_path / "b")
    assert isinstance(info.value, InputError)
    assert "--inputs" in (info.value.remedy or "")
    given = _write_npz(tmp_path / "x.npz", x=np.linspace(-1, 1, 84, dtype=np.float32)[None])
    spec = make_smoke_files(model, tmp_path / "c", inputs_npz=given)
    assert _load(tmp_path / "c" / spec.golden)["y"].shape == (1, 4)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ota.cli", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip


def test_cli_refuses_unguessable_inputs_with_exit_3_and_no_raw_runtime_error(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path)
    model = save(framed(frame=21), tmp_path / "framed.onnx")
    run = _cli(["publish", str(model), "--name", "vad", "--version", "1.0.0"], project.root_dir)
    assert run.returncode == ExitCode.INPUT, run.stderr
    assert "--inputs" in run.stderr
    assert "Traceback" not in run.stderr
    assert "[E:onnxruntime" not in run.stderr
    assert releases(project) == []


# -- several reference sets; outputs that vary ----------------------------------------------


def test_several_reference_sets_are_all_checked_on_the_device(tmp_path: Path) -> None:
    det = ocr_model("ch_PP-OCRv4_det_infer.onnx")
    rng = np.random.default_rng(3)
    a = _write_npz(tmp_path / "a.npz", x=rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
    b = _write_npz(tmp_path / "b.npz", x=rng.standard_normal((1, 3, 160, 96)).astype(np.float32))
    root = tmp_path / "bundle"
    spec = make_smoke_files(det, root, inputs_npz=[a, b])
    assert len(spec.sets()) == 2 and len(set(spec.files())) == 4
    assert SmokeSpec.from_dict(spec.to_dict()) == spec
    assert _load(root / spec.extra_sets[0][1])["sigmoid_0.tmp_0"].shape == (1, 1, 160, 96)
    run_smoke(det, root, spec, tier="default")
    second = root / spec.extra_sets[0][1]  # a wrong second golden file must fail the device
    wrong = {k: v + 0.5 for k, v in _load(second).items()}
    second.write_bytes(npz_bytes(wrong))
    with pytest.raises(SmokeFailed) as info:
        run_smoke(det, root, spec, tier="default")
    assert info.value.reason == "golden_mismatch"


def test_outputs_that_vary_need_the_shapes_check_which_the_device_applies(tmp_path: Path) -> None:
    model = save(noisy(), tmp_path / "noisy.onnx")
    with pytest.raises(GoldenError, match="not deterministic") as info:
        make_smoke_files(model, tmp_path / "v")
    assert "--golden-check shapes" in (info.value.remedy or "")
    root = tmp_path / "s"
    spec = make_smoke_files(model, root, check="shapes", runs=3)
    assert spec.to_dict()["check"] == "shapes"
    assert SmokeSpec.from_dict(spec.to_dict()) == spec
    run_smoke(model, root, spec, tier="default")  # values differ on every run: still passes
    with pytest.raises(SmokeFailed) as failed:  # the same files under the values check fail
        run_smoke(model, root, dataclasses.replace(spec, check="values"), tier="default")
    assert failed.value.reason == "golden_mismatch"
    golden = root / spec.golden  # the shapes check still catches a wrong shape
    golden.write_bytes(npz_bytes({"y": np.zeros((2, 8), np.float32)}))
    with pytest.raises(SmokeFailed, match="golden is float32"):
        run_smoke(model, root, spec, tier="default")


# -- item 12: parameters in Constant nodes and If branches ----------------------------------


@pytest.mark.parametrize(
    ("model", "at_least"),
    [
        (silero_model("silero_vad.onnx"), 500_000),  # no initializer: Constants in If branches
        (silero_model("silero_vad_openvino_16k.onnx"), 300_000),  # Constants at top level
        (ocr_model("ch_PP-OCRv4_det_infer.onnx"), 1_000_000),
        (ocr_model("ch_PP-OCRv4_rec_infer.onnx"), 2_000_000),
    ],
    ids=lambda v: v.stem if isinstance(v, Path) else str(v),
)
def test_model_card_counts_weights_in_constants_and_subgraphs(model: Path, at_least: int) -> None:
    facts = model_card(model)
    assert facts.parameters >= at_least
    assert facts.precision == ("fp32",)
    # fp32 weights take 4 bytes each: the count cannot exceed what the file can hold
    assert facts.parameters * 4 <= model.stat().st_size


def test_model_card_counts_constant_weights_not_shape_constants(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=w),
            helper.make_node("MatMul", ["x", "w"], ["o"]),
        ],
        "then", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 3])],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["o"], value_floats=[0.0, 0.0, 0.0])],
        "else", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [3])],
    )  # fmt: skip
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [1, 3])
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["flag"], value_int=1),
            helper.make_node("Cast", ["flag"], ["c"], to=TensorProto.BOOL),
            helper.make_node("If", ["c"], ["r"], then_branch=body, else_branch=other),
            helper.make_node("Constant", [], ["s"], value=shape),
            helper.make_node("Reshape", ["r", "s"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    facts = model_card(save(model, tmp_path / "m.onnx"))
    assert facts.parameters == 4 * 3 + 3  # the If's weights; not the int64 shape or flag
    assert facts.precision == ("fp32",)


# -- item 13: budgets checked on the publisher's own tier -----------------------------------


def _request(model: Path, version: str, **kw: Any) -> PublishRequest:
    return PublishRequest(source=model, name="vad", version=version, **kw)


def test_budget_exceeded_on_the_publishers_tier_is_refused_unless_overridden(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path)
    vad = silero_model("silero_vad.onnx")
    # 1 microsecond for a real model, 1 MB of peak memory for a Python child: impossible by
    # orders of magnitude on any machine, so the test does not depend on timing.
    for budgets, what in (
        ({"default": Budget(0.001, None)}, "latency p95"),
        ({"*": Budget(None, 1.0)}, "peak memory"),
    ):
        with pytest.raises(OverBudget, match=what) as info:
            publish(project, _request(vad, "1.0.0", budgets=budgets))
        assert "--allow-over-budget" in (info.value.remedy or "")
        assert info.value.exit_code == ExitCode.INPUT
    assert releases(project) == []
    assert not any(e.event == "publish" for e in read_log(project.storage))

    # another tier's budget cannot be judged on this machine: it is not checked here
    publish(project, _request(vad, "1.0.0", budgets={"npu": Budget(0.001, 1.0)}))
    publish(
        project,
        _request(vad, "1.1.0", budgets={"default": Budget(0.001, None)}, allow_over_budget=True),
    )
    log = read_log(project.storage)
    waivers = [e for e in log if e.event == "policy-waiver"]
    assert [w.details["rule"] for w in waivers] == ["smoke-budget"]
    assert "latency p95" in waivers[0].details["violation"]
    assert log[-1].event == "publish" and log[-1].details["waived"] == ["smoke-budget"]
    assert sorted(r.state.version for r in releases(project)) == ["1.0.0", "1.1.0"]


def test_degenerate_override_is_recorded_in_the_audit_log(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    det = ocr_model("ch_PP-OCRv4_det_infer.onnx")
    tiny = _write_npz(tmp_path / "tiny.npz", x=np.ones((1, 3, 1, 1), np.float32))
    with pytest.raises(GoldenError, match="degenerate"):
        publish(project, _request(det, "1.0.0", inputs_npz=tiny))
    assert releases(project) == []
    publish(project, _request(det, "1.0.0", inputs_npz=tiny, allow_degenerate_golden=True))
    waivers = [e for e in read_log(project.storage) if e.event == "policy-waiver"]
    assert [w.details["rule"] for w in waivers] == ["degenerate-golden"]


# -- end to end: a device installs a release with two sets and the shapes check ------------


# the shared published world (1.0.0, 1.1.0) is tests/test_updater.py's; here it is served
@pytest.fixture
def world(base: Base, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    with http_faults.serve(tmp_path / "repo") as fs:
        yield World(tmp_path, base, fs)


def test_device_installs_a_release_checked_by_shapes_over_two_sets(
    world: World, tmp_path: Path
) -> None:
    world.committed_at("v1")
    model = save(noisy(), tmp_path / "noisy.onnx")
    rng = np.random.default_rng(0)
    sets = [
        _write_npz(tmp_path / f"s{n}.npz", x=rng.standard_normal((n, 8)).astype(np.float32))
        for n in (1, 3)
    ]
    req = PublishRequest(source=model, name="det", version="1.2.0", inputs_npz=sets,
                         golden_check="shapes")  # fmt: skip
    publish(world.project(), req)
    res = world.update()
    assert res.status == "updated", res.to_dict()
    assert current_version(world.device) == "1.2.0"


def test_cli_options_several_inputs_shapes_check_and_budget_override(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ota.cli._main import _register, cli

    _register()
    project = make_project(tmp_path)
    model = save(noisy(), tmp_path / "noisy.onnx")
    rng = np.random.default_rng(1)
    a, b = (
        _write_npz(tmp_path / f"{n}.npz", x=rng.standard_normal((n, 8)).astype(np.float32))
        for n in (1, 2)
    )
    args = ["publish", str(model), "--project", str(project.root_dir), "--name", "noisy",
            "--inputs", str(a), "--inputs", str(b), "--golden-check", "shapes",
            "--budget", "edge:0.001:"]  # fmt: skip
    runner = CliRunner()
    over = runner.invoke(cli, [*args, "--version", "1.0.0", "--publisher-tier", "edge"])
    assert over.exit_code == ExitCode.INPUT and "--allow-over-budget" in over.output
    ok = runner.invoke(cli, [*args, "--version", "1.0.0", "--publisher-tier", "edge",
                             "--allow-over-budget", "--json"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    facts = [e for e in read_log(project.storage) if e.event == "publish"][-1].details
    assert facts["waived"] == ["smoke-budget"]
    other_tier = runner.invoke(cli, [*args, "--version", "1.1.0"])  # this machine: "default"
    assert other_tier.exit_code == 0, other_tier.output
