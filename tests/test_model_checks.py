"""Static checks of ONNX models on the publisher side: what is accepted, and every refusal."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from ota.errors import InputError
from ota.repository._model_checks import ModelFacts, ModelRejected, TensorSig, check_model
from tests import bad_models
from tests.onnx_models import mlp, save, write_mlp

BIG = 1 << 30


@pytest.fixture
def ext_model(tmp_path: Path) -> Path:
    return write_mlp(tmp_path / "model" / "model.onnx", external_data=True)


def _rejected(path: Path, match: str, **kw: int) -> ModelRejected:
    kw.setdefault("max_bytes", BIG)
    with pytest.raises(ModelRejected, match=match) as info:
        check_model(path, **kw)
    assert isinstance(info.value, InputError)
    assert "\n" not in str(info.value)
    return info.value


def test_inline_model_is_described(tmp_path: Path) -> None:
    path = write_mlp(tmp_path / "m.onnx")
    facts = check_model(path, max_bytes=BIG)
    assert isinstance(facts, ModelFacts)
    assert facts.opset == 17
    assert facts.ir_version == 9
    assert facts.inputs == (TensorSig("x", "float32", ("N", 8)),)
    assert facts.outputs == (TensorSig("y", "float32", ("N", 4)),)
    assert facts.total_size == facts.model_size == path.stat().st_size
    assert facts.external_files == ()
    assert facts.opset_imports == (("", 17),)


def test_external_data_model_is_accepted(ext_model: Path) -> None:
    facts = check_model(ext_model, max_bytes=BIG)
    data = ext_model.parent / "model.onnx.data"
    assert facts.external_files == ("model.onnx.data",)
    assert facts.total_size == ext_model.stat().st_size + data.stat().st_size
    assert facts.model_size < facts.total_size


def test_multi_dtype_signature(tmp_path: Path) -> None:
    facts = check_model(save(bad_models.multi_io(), tmp_path / "m.onnx"), max_bytes=BIG)
    assert [(s.name, s.dtype) for s in facts.inputs] == [
        ("a", "float32"),
        ("b", "int64"),
        ("c", "bool"),
    ]


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is not a model\n", os.urandom(4096), b"\x08\x07" + b"\xff" * 64],
    ids=["empty", "text", "random", "junk-proto"],
)
def test_not_onnx_is_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    _rejected(path, "not an ONNX model|invalid")


def test_truncated_model_is_rejected(tmp_path: Path) -> None:
    data = write_mlp(tmp_path / "m.onnx").read_bytes()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    _rejected(path, "not an ONNX model|invalid")


def test_missing_file_and_directory_are_rejected(tmp_path: Path) -> None:
    _rejected(tmp_path / "absent.onnx", "not a regular file")
    _rejected(tmp_path, "not a regular file")


def test_invalid_graph_is_rejected(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["undefined"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    _rejected(path, "is invalid")


@pytest.mark.parametrize(("lo", "hi"), [(18, 25), (7, 16)])
def test_opset_out_of_range_is_rejected(tmp_path: Path, lo: int, hi: int) -> None:
    path = write_mlp(tmp_path / "m.onnx")
    _rejected(path, "opset 17, outside", min_opset=lo, max_opset=hi)


def test_unknown_future_opset_is_rejected(tmp_path: Path) -> None:
    model = mlp()
    model.opset_import[0].version = 99  # onnx.checker alone accepts this
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    _rejected(path, "opset 99")


def test_inline_model_over_budget(tmp_path: Path) -> None:
    path = write_mlp(tmp_path / "m.onnx")
    _rejected(path, "over the 100 budget", max_bytes=100)


def test_external_data_counts_toward_budget(ext_model: Path) -> None:
    model_size = ext_model.stat().st_size
    check_model(ext_model, max_bytes=BIG)
    _rejected(ext_model, "with external data .* over the", max_bytes=model_size + 10)


def test_external_data_escaping_with_dotdot(ext_model: Path) -> None:
    (ext_model.parent.parent / "x.data").write_bytes(
        (ext_model.parent / "model.onnx.data").read_bytes()
    )
    bad = bad_models.relocate_external_data(ext_model, "../x.data", ext_model.parent / "b.onnx")
    _rejected(bad, "leaves the model folder")
    bad = bad_models.relocate_external_data(
        ext_model, "sub/../../x.data", ext_model.parent / "c.onnx"
    )
    _rejected(bad, "leaves the model folder")


@pytest.mark.parametrize("location", ["/etc/passwd", "\\\\server\\share\\x.data", "C:\\x.data"])
def test_external_data_absolute_location(ext_model: Path, location: str) -> None:
    bad = bad_models.relocate_external_data(ext_model, location, ext_model.parent / "b.onnx")
    _rejected(bad, "absolute location")


def test_external_data_symlink_out_of_folder(ext_model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.data"
    outside.write_bytes((ext_model.parent / "model.onnx.data").read_bytes())
    (ext_model.parent / "link.data").symlink_to(outside)
    bad = bad_models.relocate_external_data(ext_model, "link.data", ext_model.parent / "b.onnx")
    _rejected(bad, "resolves outside the model folder")


def test_external_data_symlinked_directory_out_of_folder(ext_model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "w.data").write_bytes((ext_model.parent / "model.onnx.data").read_bytes())
    (ext_model.parent / "sub").symlink_to(outside, target_is_directory=True)
    bad = bad_models.relocate_external_data(ext_model, "sub/w.data", ext_model.parent / "b.onnx")
    _rejected(bad, "resolves outside the model folder")


def test_external_data_symlink_inside_folder_is_refused(ext_model: Path) -> None:
    (ext_model.parent / "link.data").symlink_to(ext_model.parent / "model.onnx.data")
    bad = bad_models.relocate_external_data(ext_model, "link.data", ext_model.parent / "b.onnx")
    _rejected(bad, "is a symlink")


def test_external_data_file_missing(ext_model: Path) -> None:
    (ext_model.parent / "model.onnx.data").unlink()
    _rejected(ext_model, "model.onnx.data of tensor .* is missing")


def test_external_data_truncated(ext_model: Path) -> None:
    data = ext_model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-16])
    _rejected(ext_model, "past the end of model.onnx.data")
