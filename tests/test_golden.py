"""Reference inputs and golden outputs: generation, validation of given inputs, determinism."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from ota.bundle import SMOKE_GOLDEN_FILE, SMOKE_INPUTS_FILE, Budget, SmokeSpec
from ota.errors import InputError
from ota.repository._golden import (
    GoldenError,
    make_smoke_files,
    measure_reference,
    npz_bytes,
    read_npz,
)
from tests import bad_models
from tests.onnx_models import save, write_mlp


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_mlp(tmp_path / "model" / "model.onnx")


def _load(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_generated_files_and_spec(model: Path, tmp_path: Path) -> None:
    budgets = {"*": Budget(50.0, 400.0), "cam-v1": Budget(20.0, None)}
    spec = make_smoke_files(
        model, tmp_path / "b", batch=3, runs=7, rtol=1e-2, atol=1e-3, budgets=budgets
    )
    assert spec == SmokeSpec(
        inputs=SMOKE_INPUTS_FILE, golden=SMOKE_GOLDEN_FILE, rtol=1e-2, atol=1e-3, runs=7,
        budgets=budgets,
    )  # fmt: skip
    assert SmokeSpec.from_dict(spec.to_dict()) == spec
    inputs = _load(tmp_path / "b" / SMOKE_INPUTS_FILE)
    golden = _load(tmp_path / "b" / SMOKE_GOLDEN_FILE)
    assert inputs["x"].shape == (3, 8)
    assert inputs["x"].dtype == np.float32
    assert golden["y"].shape == (3, 4)
    assert golden["y"].dtype == np.float32


def test_golden_files_are_deterministic(model: Path, tmp_path: Path) -> None:
    make_smoke_files(model, tmp_path / "a", seed=5)
    make_smoke_files(model, tmp_path / "b", seed=5)
    make_smoke_files(model, tmp_path / "c", seed=6)
    for rel in (SMOKE_INPUTS_FILE, SMOKE_GOLDEN_FILE):
        first = (tmp_path / "a" / rel).read_bytes()
        assert first == (tmp_path / "b" / rel).read_bytes()
        assert first != (tmp_path / "c" / rel).read_bytes()
        with zipfile.ZipFile(tmp_path / "a" / rel) as archive:
            assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_npz_bytes_independent_of_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    arrays: dict[str, NDArray[Any]] = {
        "a": np.arange(6, dtype=np.int64).reshape(2, 3),
        "b": np.ones(3, np.float16),
    }
    first = npz_bytes(arrays)
    monkeypatch.setattr("time.time", lambda: 2_000_000_000.0)
    monkeypatch.setattr("time.localtime", lambda *_: (2033, 5, 18, 3, 33, 20, 2, 138, 0))
    assert npz_bytes(arrays) == first


def test_generated_inputs_follow_signature_dtypes(tmp_path: Path) -> None:
    path = save(bad_models.multi_io(), tmp_path / "m.onnx")
    make_smoke_files(path, tmp_path / "b", batch=4)
    inputs = _load(tmp_path / "b" / SMOKE_INPUTS_FILE)
    assert {k: (v.dtype.name, v.shape) for k, v in inputs.items()} == {
        "a": ("float32", (4, 3)),
        "b": ("int64", (4,)),
        "c": ("bool", (4,)),
    }
    assert inputs["b"].min() >= 0
    assert inputs["b"].max() < 10
    golden = _load(tmp_path / "b" / SMOKE_GOLDEN_FILE)
    np.testing.assert_array_equal(golden["t"], np.where(inputs["c"], inputs["b"], 0))


def test_given_inputs_are_used(model: Path, tmp_path: Path) -> None:
    given = tmp_path / "given.npz"
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    np.savez_compressed(given, x=x)
    make_smoke_files(model, tmp_path / "b", inputs_npz=given)
    np.testing.assert_array_equal(_load(tmp_path / "b" / SMOKE_INPUTS_FILE)["x"], x)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"z": np.zeros((1, 8), np.float32)}, "names differ"),
        ({"x": np.zeros((1, 8), np.float64)}, "float64"),
        ({"x": np.zeros(8, np.float32)}, "rank"),
        ({"x": np.zeros((1, 9), np.float32)}, "axis 1"),
        ({"x": np.zeros((1, 8), np.float32), "extra": np.zeros(1)}, "names differ"),
    ],
    ids=["name", "dtype", "rank", "fixed-dim", "extra"],
)
def test_given_inputs_must_match_signature(
    model: Path, tmp_path: Path, arrays: dict[str, Any], match: str
) -> None:
    given = tmp_path / "given.npz"
    np.savez(given, **arrays)
    with pytest.raises(GoldenError, match=match) as info:
        make_smoke_files(model, tmp_path / "b", inputs_npz=given)
    assert isinstance(info.value, InputError)
    assert not (tmp_path / "b").exists()


def test_pickled_inputs_are_refused(model: Path, tmp_path: Path) -> None:
    given = tmp_path / "given.npz"
    np.savez(given, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(GoldenError, match="bad npz"):
        make_smoke_files(model, tmp_path / "b", inputs_npz=given)


def test_garbage_inputs_file_is_refused(model: Path, tmp_path: Path) -> None:
    given = tmp_path / "given.npz"
    given.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(GoldenError, match="bad npz"):
        make_smoke_files(model, tmp_path / "b", inputs_npz=given)


def test_oversized_inputs_are_refused(model: Path, tmp_path: Path) -> None:
    with pytest.raises(GoldenError, match="over the 64 limit"):
        make_smoke_files(model, tmp_path / "b", batch=100, max_bytes=64)


def test_nan_golden_is_refused(tmp_path: Path) -> None:
    path = save(bad_models.nan_output(), tmp_path / "m.onnx")
    with pytest.raises(GoldenError, match="not finite"):
        make_smoke_files(path, tmp_path / "b")


def test_unloadable_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(GoldenError, match="cannot load"):
        make_smoke_files(path, tmp_path / "b")


def test_read_npz_bounds(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    path.write_bytes(npz_bytes({"a": np.zeros(1000, np.float32)}))
    assert read_npz(path)["a"].shape == (1000,)
    with pytest.raises(GoldenError, match="oversized"):
        read_npz(path, max_bytes=1000)


def test_measure_reference(model: Path, tmp_path: Path) -> None:
    make_smoke_files(model, tmp_path / "b")
    latency, peak = measure_reference(model, tmp_path / "b" / SMOKE_INPUTS_FILE, runs=5)
    assert 0.0 < latency < 1000.0
    assert 10.0 < peak < 1000.0


# -- issue 12 item 11: smoke spec format, degenerate outputs, candidate inputs ---------------


def test_smoke_spec_new_keys_only_when_used() -> None:
    plain = SmokeSpec()
    assert set(plain.to_dict()) == {"inputs", "golden", "rtol", "atol", "runs", "budgets"}
    both = SmokeSpec(check="shapes", extra_sets=(("smoke/i2.npz", "smoke/g2.npz"),))
    assert SmokeSpec.from_dict(both.to_dict()) == both
    assert both.files() == (SMOKE_INPUTS_FILE, SMOKE_GOLDEN_FILE, "smoke/i2.npz", "smoke/g2.npz")


@pytest.mark.parametrize(
    "change",
    [
        {"check": "nothing"},
        {"check": "values"},  # the default is never written: its presence is not canonical
        {"extra_sets": []},
        {"extra_sets": [{"inputs": "../x.npz", "golden": "smoke/g.npz"}]},
        {"extra_sets": [{"inputs": "smoke/i.npz"}]},
        {"extra_sets": [{"inputs": SMOKE_INPUTS_FILE, "golden": "smoke/g2.npz"}]},
        {"extra_sets": [{"inputs": f"s/i{n}", "golden": f"s/g{n}"} for n in range(16)]},
        {"unknown": 1},
    ],
    ids=["check", "default-check", "empty-sets", "escape", "half-set", "dup", "many", "extra"],
)
def test_smoke_spec_refuses_bad_optional_keys(change: dict[str, Any]) -> None:
    from ota.bundle import FormatError

    with pytest.raises(FormatError):
        SmokeSpec.from_dict({**SmokeSpec().to_dict(), **change})


def test_degenerate_outputs() -> None:
    from ota.repository._smoke_inputs import degenerate_outputs

    outputs: dict[str, NDArray[Any]] = {
        "zero": np.zeros((1, 1, 32, 32), np.float32),
        "tiny": np.full((4,), 3e-6, np.float32) * np.arange(4, dtype=np.float32),
        "flat": np.full((3,), 7.0, np.float32),
        "ints": np.ones((5,), np.int64),
        "empty": np.zeros((0, 4), np.float32),
        "score": np.zeros((1, 1), np.float32),  # one element: not judged
        "fine": np.arange(4, dtype=np.float32),
        "labels": np.arange(4, dtype=np.int64),
    }
    found = degenerate_outputs(outputs, 1e-3, 1e-4)
    assert found == [
        "'zero' is all zero", "'tiny' is zero within atol", "'flat' is constant",
        "'ints' is constant", "'empty' is empty",
    ]  # fmt: skip
    assert degenerate_outputs({"tiny": outputs["tiny"]}, 0.0, 0.0) == []


def test_candidates_share_symbols_and_keep_state_axes_at_batch() -> None:
    from ota.repository._smoke_inputs import SIZE_LADDER, candidates

    sig: list[tuple[str, str, list[Any]]] = [
        ("audio", "tensor(float)", ["batch", "samples"]),
        ("state", "tensor(float)", [2, None, 128]),
        ("mask", "tensor(bool)", ["batch", "samples"]),
    ]
    dtypes = {"audio": "float32", "state": "float32", "mask": "bool"}
    cands = list(candidates(sig, dtypes, batch=2, max_bytes=1 << 30))
    first = cands[0].inputs
    assert first["audio"].shape == (2, SIZE_LADDER[0]) == first["mask"].shape
    assert first["state"].shape == (2, 2, 128)
    assert len({c.description for c in cands}) == len(cands) <= 32
    again = list(candidates(sig, dtypes, batch=2, max_bytes=1 << 30))
    pairs = zip(cands, again, strict=True)
    assert all(np.array_equal(a.inputs["audio"], b.inputs["audio"]) for a, b in pairs)
    small = list(candidates(sig, dtypes, batch=1, max_bytes=2000))
    assert small[0].error and "over the 2000 limit" in small[0].error
    assert any(not c.error for c in small)


def test_integer_hints_follow_casts_into_subgraphs(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from ota.repository._golden import generate_inputs
    from ota.repository._smoke_inputs import int_hints

    def branch(value: float) -> Any:
        return helper.make_graph(
            [helper.make_node("Constant", [], ["o"], value_float=value)], "b", [],
            [helper.make_tensor_value_info("o", TensorProto.FLOAT, [])],
        )  # fmt: skip

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["rate"], ["r"], to=TensorProto.INT32),
            helper.make_node("Constant", [], ["k"], value_int=16000),
            helper.make_node("Cast", ["k"], ["k32"], to=TensorProto.INT32),
            helper.make_node("Constant", [], ["k8"],
                             value=helper.make_tensor("k8", TensorProto.INT32, [], [8000])),
            helper.make_node("Equal", ["k8", "r"], ["is8"]),
            helper.make_node("If", ["is8"], ["y"], then_branch=branch(1.0),
                             else_branch=branch(2.0)),
        ],
        "hinted",
        [helper.make_tensor_value_info("rate", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = save(model, tmp_path / "m.onnx")
    sig: list[tuple[str, str, list[Any]]] = [("rate", "tensor(int64)", [])]
    assert int_hints(path, sig, {"rate": "int64"}) == {"rate": [8000]}
    assert int_hints(path, [("rate", "tensor(int64)", [100])], {"rate": "int64"}) == {}
    assert generate_inputs(sig)["rate"].shape == ()
