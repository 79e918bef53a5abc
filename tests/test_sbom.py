"""ota.sbom: model card from the ONNX graph and the CycloneDX 1.6 ML-BOM."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ota.errors import InputError
from ota.sbom import (
    SbomError,
    SbomLimits,
    build_mlbom,
    load_sbom,
    model_card,
    validate_sbom,
)
from tests.onnx_models import mlp, save, write_mlp


def _matmul_model(dtype: int, np_dtype: type[np.generic], *, seed: int = 0) -> onnx.ModelProto:
    """y = x @ W + b in ``dtype`` (fp16 / bf16 models)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np_dtype), "w")
    b = numpy_helper.from_array(rng.standard_normal((16,)).astype(np_dtype), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", dtype, ["batch", 32])],
        [helper.make_tensor_value_info("y", dtype, ["batch", 16])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _qdq_model(*, int8_weights: bool = True) -> onnx.ModelProto:
    """A QDQ-quantized linear layer: x -> Q -> DQ -> MatMul(DQ(W_int8)) -> y (float32).

    With ``int8_weights=False`` the weight is stored in fp32 and quantized at run time."""
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 127, size=(64, 64), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
    ]
    if int8_weights:
        inits.append(numpy_helper.from_array(w, "w_q"))
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"]))
    else:
        inits.append(numpy_helper.from_array(w.astype(np.float32) * 0.01, "w_f"))
        nodes += [
            helper.make_node("QuantizeLinear", ["w_f", "w_scale", "w_zp"], ["wq"]),
            helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"]),
        ]
    nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _param_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)


def _files(*paths: Path, root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_size,
        )
        for p in paths
    }


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, int]]]:
    """A model with external data laid out as in a bundle, and its file table."""
    root = tmp_path / "bundle"
    model = write_mlp(root / "model" / "model.onnx", external_data=True)
    release = root / "release.json"
    release.write_text("{}")
    files = _files(model, model.with_name("model.onnx.data"), release, root=root)
    return model, files


def _build(model: Path, files: dict[str, tuple[str, int]], **kw: object) -> bytes:
    args: dict[str, object] = {
        "name": "detector",
        "version": "1.0.0",
        "model_path": model,
        "files": files,
        "runtime_range": ">=1.20,<2",
        "runtime_version": "1.31.1",
    }
    args.update(kw)
    return build_mlbom(**args)  # type: ignore[arg-type]


# -- model card ----------------------------------------------------------------------------


def test_model_card_of_fp32_mlp(tmp_path: Path) -> None:
    model = mlp(in_features=8, hidden=16, out_features=4, layers=2)
    facts = model_card(save(model, tmp_path / "m.onnx"))
    assert facts.parameters == _param_count(model) == 8 * 16 + 16 + 16 * 16 + 16 + 16 * 4 + 4
    assert facts.precision == ("fp32",)
    assert not facts.quantized
    assert facts.producer_name == "edge-ota-tests"
    assert facts.ir_version == 9
    assert facts.opsets == (("ai.onnx", 17),)
    assert [t.signature() for t in facts.inputs] == ["x: float32[N,8]"]
    assert [t.signature() for t in facts.outputs] == ["y: float32[N,4]"]
    assert facts.node_count == 5
    assert facts.op_types == (("Gemm", 3), ("Relu", 2))
    assert model_card(tmp_path / "m.onnx", top_n=1).op_types == (("Gemm", 3),)


def test_external_data_is_counted_but_never_read(tmp_path: Path) -> None:
    model = mlp(in_features=32, hidden=64, out_features=8, layers=3)
    path = save(model, tmp_path / "m.onnx", external_data=True)
    path.with_name("m.onnx.data").unlink()  # facts come from the graph's dims alone
    facts = model_card(path)
    assert facts.parameters == _param_count(model)
    assert facts.precision == ("fp32",)


@pytest.mark.parametrize(
    ("dtype", "np_dtype", "precision", "sig"),
    [
        (TensorProto.FLOAT16, np.float16, "fp16", "x: float16[batch,32]"),
        (TensorProto.DOUBLE, np.float64, "fp64", "x: float64[batch,32]"),
    ],
)
def test_half_and_double_precision(
    tmp_path: Path, dtype: int, np_dtype: type[np.generic], precision: str, sig: str
) -> None:
    facts = model_card(save(_matmul_model(dtype, np_dtype), tmp_path / "m.onnx"))
    assert facts.precision == (precision,)
    assert facts.parameters == 32 * 16 + 16
    assert facts.inputs[0].signature() == sig


def test_int8_qdq_model(tmp_path: Path) -> None:
    model = _qdq_model()
    facts = model_card(save(model, tmp_path / "q.onnx"))
    assert facts.quantized
    assert facts.precision == ("int8",)  # fp32 scales are < 1% of the weights
    assert facts.parameters == _param_count(model) == 64 * 64 + 4
    assert dict(facts.dtype_parameters) == {"int8": 64 * 64 + 2, "fp32": 2}
    assert dict(facts.op_types) == {"DequantizeLinear": 2, "QuantizeLinear": 1, "MatMul": 1}


def test_fp32_weights_quantized_at_run_time_are_mixed(tmp_path: Path) -> None:
    facts = model_card(save(_qdq_model(int8_weights=False), tmp_path / "q.onnx"))
    assert facts.precision == ("fp32", "int8")
    assert facts.quantized


def test_matmul_integer_and_symbolic_unknown_dims(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 4), np.uint8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
        "mmi",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    facts = model_card(save(model, tmp_path / "m.onnx"))
    assert facts.precision == ("int8",)
    assert facts.inputs[0].shape == ("?", 4)
    assert facts.outputs[0].signature() == "y: int32[?]"
    assert facts.outputs[0].shape is None


def test_subgraph_initializers_and_nodes_count(tmp_path: Path) -> None:
    def branch(name: str, value: float) -> onnx.GraphProto:
        c = numpy_helper.from_array(np.full((3,), value, np.float32), f"{name}_c")
        return helper.make_graph(
            [helper.make_node("Identity", [f"{name}_c"], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [3])],
            [c],
        )

    node = helper.make_node(
        "If", ["cond"], ["y"], then_branch=branch("t", 1.0), else_branch=branch("e", 2.0)
    )
    graph = helper.make_graph(
        [node],
        "if",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    facts = model_card(save(model, tmp_path / "m.onnx"))
    assert facts.parameters == 6
    assert facts.node_count == 3
    assert facts.inputs[0].shape == ()


def test_model_card_refuses_bad_input(tmp_path: Path) -> None:
    path = write_mlp(tmp_path / "m.onnx")
    with pytest.raises(SbomError, match="exceeds the limit") as e:
        model_card(path, limits=SbomLimits(max_model_bytes=100))
    assert isinstance(e.value, InputError)
    assert "external data" in e.value.diagnostics()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(SbomError, match="not an ONNX model"):
        model_card(junk)
    with pytest.raises(SbomError, match="not a regular file"):
        model_card(tmp_path)
    with pytest.raises(SbomError, match="not a regular file"):
        model_card(tmp_path / "missing.onnx")


# -- ML-BOM --------------------------------------------------------------------------------


def test_mlbom_validates_and_lists_every_file_hash(
    bundle: tuple[Path, dict[str, tuple[str, int]]],
) -> None:
    model, files = bundle
    data = _build(
        model,
        files,
        datasets=["coco-2017"],
        licenses=["Apache-2.0"],
        supplier="ACME Vision",
        task="object-detection",
        architecture="multilayer perceptron",
    )
    doc = validate_sbom(data)
    assert doc["specVersion"] == "1.6"
    meta = doc["metadata"]["component"]
    assert meta["type"] == "machine-learning-model"
    assert meta["purl"] == "pkg:generic/detector@1.0.0"
    assert meta["hashes"] == [{"alg": "SHA-256", "content": files["model/model.onnx"][0]}]
    assert meta["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    params = meta["modelCard"]["modelParameters"]
    assert params["task"] == "object-detection"
    assert params["inputs"] == [{"format": "x: float32[N,8]"}]
    assert params["datasets"] == [{"ref": "dataset:coco-2017"}]
    view = load_sbom(data)
    assert view.file_hashes() == {path: sha for path, (sha, _) in files.items()}
    runtime = next(c for c in view.components if c.type == "library")
    assert runtime.purl == "pkg:pypi/onnxruntime@1.31.1"
    assert view.runtime_range == ">=1.20,<2"
    assert [c.name for c in view.components if c.type == "data"] == ["coco-2017"]
    assert view.model_card == model_card(model)
    assert "timestamp" not in doc["metadata"]
    dependencies = {d["ref"]: d.get("dependsOn", []) for d in doc["dependencies"]}
    assert dependencies["model"] == ["dataset:coco-2017", "runtime"]


def test_mlbom_bytes_are_deterministic(bundle: tuple[Path, dict[str, tuple[str, int]]]) -> None:
    model, files = bundle
    first, second = _build(model, files), _build(model, files)
    assert first == second
    assert (
        first
        == json.dumps(
            json.loads(first), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )
    changed = dict(files, **{"release.json": ("0" * 64, 2)})
    assert json.loads(_build(model, changed))["serialNumber"] != json.loads(first)["serialNumber"]
    fixed = uuid.UUID(int=7)
    when = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    doc = json.loads(_build(model, files, serial=fixed, timestamp=when))
    assert doc["serialNumber"] == f"urn:uuid:{fixed}"
    assert doc["metadata"]["timestamp"].startswith("2026-11-01T12:00:00")


def test_schema_invalid_model_card_is_rejected(
    bundle: tuple[Path, dict[str, tuple[str, int]]],
) -> None:
    model, files = bundle
    bad = {"modelParameters": {"approach": {"type": "telepathy"}}}
    with pytest.raises(SbomError, match=r"strict schema at \$\.metadata\.component\.modelCard"):
        _build(model, files, model_card_extra=bad)
    with pytest.raises(SbomError, match=r"unexpected|Additional properties"):
        _build(model, files, model_card_extra={"hyperparameters": {"lr": 0.1}})
    ok = {"considerations": {"useCases": ["people counting"]}}
    doc = validate_sbom(_build(model, files, model_card_extra=ok))
    assert doc["metadata"]["component"]["modelCard"]["considerations"]["useCases"] == [
        "people counting"
    ]


def test_validate_sbom_rejects_tampering_and_bounds(
    bundle: tuple[Path, dict[str, tuple[str, int]]],
) -> None:
    model, files = bundle
    data = _build(model, files)
    doc = json.loads(data)
    doc["components"][0]["hashes"] = [{"alg": "SHA-256", "content": "not-hex"}]
    with pytest.raises(SbomError, match="strict schema"):
        validate_sbom(json.dumps(doc).encode())
    doc = json.loads(data)
    doc["metadata"]["component"]["modelCard"]["owner"] = "x"
    with pytest.raises(SbomError, match="strict schema"):
        load_sbom(json.dumps(doc).encode())
    with pytest.raises(SbomError, match="exceeds the limit"):
        validate_sbom(data, limits=SbomLimits(max_sbom_bytes=100))
    with pytest.raises(SbomError, match="more than 2 components"):
        validate_sbom(data, limits=SbomLimits(max_components=2))
    with pytest.raises(SbomError, match=r"CycloneDX 1\.6"):
        validate_sbom(data.replace(b'"specVersion":"1.6"', b'"specVersion":"1.5"'))
    for junk in (b"[]", b"{", b"[" * 100_000):
        with pytest.raises(SbomError):
            validate_sbom(junk)


def test_mlbom_refuses_bad_inputs(bundle: tuple[Path, dict[str, tuple[str, int]]]) -> None:
    model, files = bundle
    with pytest.raises(SbomError, match="outside"):
        _build(model, files, runtime_version="1.19.0")
    with pytest.raises(SbomError, match="PEP 440 specifier"):
        _build(model, files, runtime_range="newest please")
    with pytest.raises(SbomError, match="its own hash"):
        _build(model, dict(files, **{"sbom.cdx.json": ("0" * 64, 1)}))
    with pytest.raises(SbomError, match="bad sha256"):
        _build(model, dict(files, **{"release.json": ("XYZ", 1)}))
    with pytest.raises(SbomError, match="unsafe bundle path"):
        _build(model, dict(files, **{"../evil": ("0" * 64, 1)}))
    with pytest.raises(InputError, match="invalid version"):
        _build(model, files, version="latest")


def test_runtime_without_version_has_an_unversioned_purl(
    bundle: tuple[Path, dict[str, tuple[str, int]]],
) -> None:
    model, files = bundle
    view = load_sbom(_build(model, files, runtime="onnxruntime_gpu", runtime_version=None))
    runtime = next(c for c in view.components if c.type == "library")
    assert (runtime.name, runtime.version, runtime.purl) == (
        "onnxruntime-gpu",
        "",
        "pkg:pypi/onnxruntime-gpu",
    )


def test_import_is_cheap() -> None:
    code = (
        "import sys, ota.sbom; "
        "heavy = ('cyclonedx', 'onnx', 'packageurl', 'jsonschema', 'packaging'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_large_sboms_validate_in_slices(bundle: tuple[Path, dict[str, tuple[str, int]]]) -> None:
    """Hundreds of files: validated in slices (jsonschema's uniqueItems is quadratic), with
    uniqueness, bom-ref uniqueness and error positions checked over the whole array."""
    model, files = bundle
    many = dict(files)
    many.update(
        {f"chunks/c{i:04d}": (hashlib.sha256(b"%d" % i).hexdigest(), i) for i in range(300)}
    )
    data = _build(model, many)
    assert len(load_sbom(data).file_hashes()) == len(many)
    doc = json.loads(data)
    index = next(i for i, c in enumerate(doc["components"]) if c["name"] == "chunks/c0250")
    assert index > 128
    doc["components"][index]["hashes"][0]["alg"] = "SHA-257"
    with pytest.raises(SbomError, match=rf"at \$\.components\[{index}\]\.hashes\[0\]\.alg"):
        validate_sbom(json.dumps(doc).encode())
    doc = json.loads(data)
    doc["components"].append(doc["components"][-1])
    with pytest.raises(SbomError, match="duplicate bom-ref"):
        validate_sbom(json.dumps(doc).encode())
    doc["components"][-1] = dict(doc["components"][-1], **{"bom-ref": "other"})
    doc["components"].append(dict(doc["components"][-1]))
    doc["components"][-1].pop("bom-ref")
    doc["components"][-2].pop("bom-ref")
    with pytest.raises(SbomError, match="duplicate components"):
        validate_sbom(json.dumps(doc).encode())


def test_model_card_refuses_malformed_constant_nodes(tmp_path: Path) -> None:
    """Review (issue 12): the new Constant-node parameter counter read ``node.output[0]``
    and ``DataType.Name(t.data_type)`` unguarded: a Constant without outputs, or with an
    unknown element type, raised IndexError/ValueError out of :func:`model_card` instead of
    its documented SbomError (publish is shielded by onnx.checker; the library API is not)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    no_output = helper.make_node(
        "Constant", [], [], value=helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0])
    )
    bad_type = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    bad_type.data_type = 999
    def card_of(node: onnx.NodeProto) -> Any:
        graph = helper.make_graph([node, helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        path = tmp_path / "m.onnx"
        path.write_bytes(helper.make_model(graph).SerializeToString())
        return model_card(path)

    assert card_of(no_output).parameters == 0  # names no value: no weight
    with pytest.raises(SbomError, match="malformed"):
        card_of(helper.make_node("Constant", [], ["c"], value=bad_type))
