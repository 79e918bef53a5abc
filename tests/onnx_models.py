"""ONNX models for tests and benchmarks, built with ``onnx.helper`` (no downloads).

Every builder is deterministic for a given seed, so the same call gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp(
    *,
    in_features: int = 8,
    hidden: int = 16,
    out_features: int = 4,
    layers: int = 2,
    seed: int = 0,
    opset: int = 17,
) -> onnx.ModelProto:
    """A small MLP: (Gemm + Relu) * layers, then Gemm. Input ``x`` [N, in], output ``y``."""
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    prev, width = "x", in_features
    for i in range(layers + 1):
        last = i == layers
        out_w = out_features if last else hidden
        w = rng.standard_normal((width, out_w)).astype(np.float32) * 0.5
        b = rng.standard_normal((out_w,)).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        gemm_out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"r{i}"]))
            prev = f"r{i}"
        width = out_w
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_features])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edge-ota-tests"
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def big_mlp(size_mb: int, *, seed: int = 0, layers: int = 8) -> onnx.ModelProto:
    """An MLP of roughly ``size_mb`` MB of float32 weights, split over ``layers`` square layers,
    so that a "fine-tune" can change some layers and leave the others byte-identical."""
    per_layer = size_mb * 1024 * 1024 // 4 // layers
    width = int(per_layer**0.5)
    return mlp(in_features=width, hidden=width, out_features=width, layers=layers - 1, seed=seed)


def fine_tune(model: onnx.ModelProto, fraction: float = 0.1, *, seed: int = 1) -> onnx.ModelProto:
    """Return a copy with the last ``fraction`` of weight bytes perturbed (a head fine-tune)."""
    tuned = onnx.ModelProto()
    tuned.CopyFrom(model)
    weights = [t for t in tuned.graph.initializer if t.name.startswith("w")]
    total = sum(len(t.raw_data) for t in weights)
    budget = int(total * fraction)
    rng = np.random.default_rng(seed)
    for t in reversed(weights):
        if budget <= 0:
            break
        arr = numpy_helper.to_array(t).copy()
        flat = arr.reshape(-1)
        n = min(flat.size, budget // 4)
        if n <= 0:
            break
        flat[-n:] += rng.standard_normal(n).astype(np.float32) * 0.01
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        budget -= n * 4
    return tuned


def save(model: onnx.ModelProto, path: Path, *, external_data: bool = False) -> Path:
    """Save a model; with ``external_data`` the weights go to ``<name>.data`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def write_mlp(path: Path, *, seed: int = 0, external_data: bool = False, **kw: int) -> Path:
    """Build :func:`mlp` and save it at ``path``."""
    return save(mlp(seed=seed, **kw), path, external_data=external_data)


def noisy(*, width: int = 8, opset: int = 17) -> onnx.ModelProto:
    """``y = x + RandomNormalLike(x)`` without a seed: outputs differ on every run, as in a
    model that samples (the case for ``--golden-check shapes``)."""
    graph = helper.make_graph(
        [
            helper.make_node("RandomNormalLike", ["x"], ["noise"], scale=0.1),
            helper.make_node("Add", ["x", "noise"], ["y"]),
        ],
        "noisy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def framed(*, frame: int = 21, opset: int = 17) -> onnx.ModelProto:
    """Input ``x[N, L]`` reshaped to frames of ``frame`` samples: only lengths that are a
    multiple of ``frame`` run, which no generic size guess is (the case for ``--inputs``)."""
    shape = numpy_helper.from_array(np.array([0, -1, frame], dtype=np.int64), "frames")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "frames"], ["f"]),
            helper.make_node("ReduceMean", ["f"], ["y"], axes=[2], keepdims=0),
        ],
        "framed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "F"])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
