"""Pathological ONNX models for the static checks and the smoke sandbox, built with ``onnx.helper``.

Each builder returns a valid ``ModelProto`` (it passes ``onnx.checker``) whose *behaviour* is
hostile: it allocates without bound, runs forever, or is slow. The file-level attacks (garbage,
truncation, escaping external data) are produced by :func:`relocate_external_data` and by the
tests themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edge-ota-tests"
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def huge_alloc(elements: int = 16 * 1024**3) -> onnx.ModelProto:
    """``y = ReduceSum(Expand(x, [elements]))``: at run time it needs ``4 * elements`` bytes
    (64 GiB by default). The shape depends on the input, so nothing is folded at load time."""
    shape = numpy_helper.from_array(np.array([elements], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
        ],
        "huge_alloc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [shape],
    )
    return _model(graph)


def endless_loop(trip_count: int = 2**62) -> onnx.ModelProto:
    """A ``Loop`` that adds 1 to ``x`` ``trip_count`` times: effectively never finishes."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "endless_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [
            numpy_helper.from_array(np.array(trip_count, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    return _model(graph)


def matmul_chain(width: int = 256, depth: int = 8, *, seed: int = 0) -> onnx.ModelProto:
    """``depth`` square MatMuls of ``width``: a model whose latency is easy to dial up."""
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    prev = "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        inits,
    )
    return _model(graph)


def multi_io() -> onnx.ModelProto:
    """Inputs of several dtypes (float32 ``a`` [N, 3], int64 ``b`` [N], bool ``c`` [N]) and two
    outputs: ``s = a * 2`` (float32) and ``t = Where(c, b, 0)`` (int64)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["a", "two"], ["s"]),
            helper.make_node("Where", ["c", "b", "zero"], ["t"]),
        ],
        "multi_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, ["N"]),
        ],
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("t", TensorProto.INT64, ["N"]),
        ],
        [
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        ],
    )
    return _model(graph)


def nan_output() -> onnx.ModelProto:
    """``y = Sqrt(-Abs(x) - 1)``: every output is NaN."""
    graph = helper.make_graph(
        [
            helper.make_node("Abs", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["n"]),
            helper.make_node("Sub", ["n", "one"], ["m"]),
            helper.make_node("Sqrt", ["m"], ["y"]),
        ],
        "nan_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")],
    )
    return _model(graph)


def relocate_external_data(model_path: Path, location: str, out_path: Path) -> Path:
    """Rewrite every external-data ``location`` of the model at ``model_path`` to ``location``
    and save the result (without touching any data file) at ``out_path``."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_path))
    return out_path
