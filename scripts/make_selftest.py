"""Build the device's runtime self-test: ``client/_selftest/{model.onnx,inputs.npz,golden.npz}``.

A runtime bundle is smoke-tested by running the device's committed models with it. A device
that has no committed model yet (a first install, or the runtime listed first) runs this tiny
model instead: MatMul, Add, Relu and Softmax at opset 13 (IR 7, so any onnxruntime >= 1.8 can
load it), with golden outputs computed by numpy, independently of any runtime.

Deterministic: the same bytes every run (``tests/test_selftest_assets.py`` checks for drift).
Run: ``python scripts/make_selftest.py [OUT_DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ota.repository._golden import write_npz

OUT = Path(__file__).resolve().parents[1] / "client" / "_selftest"


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261123)
    return {
        "w1": rng.standard_normal((8, 16)).astype(np.float32),
        "b1": rng.standard_normal(16).astype(np.float32),
        "w2": rng.standard_normal((16, 4)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
        "x": rng.standard_normal((2, 8)).astype(np.float32),
    }


def model(a: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(a[k], k) for k in ("w1", "b1", "w2", "b2")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "edge-ota-runtime-selftest",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7,
                          producer_name="edge-ota", producer_version="selftest-1")
    onnx.checker.check_model(m, full_check=True)
    return m


def golden(a: dict[str, np.ndarray]) -> np.ndarray:
    h = np.maximum(a["x"] @ a["w1"] + a["b1"], 0.0)
    logits = (h @ a["w2"] + a["b2"]).astype(np.float64)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def build(out: Path) -> None:
    a = arrays()
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(model(a).SerializeToString(deterministic=True))
    write_npz(out / "inputs.npz", {"x": a["x"]})
    write_npz(out / "golden.npz", {"probs": golden(a)})


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
