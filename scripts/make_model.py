"""Write a small ONNX model to try edge-ota with (the quickstart's ``model.onnx``).

    python scripts/make_model.py model.onnx               # version 1
    python scripts/make_model.py model-1.1.onnx --seed 1  # same shape, other weights

A two-layer perceptron, input ``x`` float32 [1, 64], output ``y`` float32 [1, 8], about 40 KB,
built with ``onnx.helper`` (no download). The weights depend only on ``--seed``, so the same
command writes the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(seed: int = 0, inputs: int = 64, hidden: int = 128, outputs: int = 8) -> onnx.ModelProto:
    """The model: y = relu(x @ w1 + b1) @ w2 + b2, with seeded weights."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((inputs, hidden)) / np.sqrt(inputs),
        "b1": rng.standard_normal(hidden) * 0.1,
        "w2": rng.standard_normal((hidden, outputs)) / np.sqrt(hidden),
        "b2": rng.standard_normal(outputs) * 0.1,
    }
    tensors = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["y0"]),
            helper.make_node("Add", ["y0", "b2"], ["y"]),
        ],
        "quickstart-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the .onnx file")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (a new version)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(build(args.seed).SerializeToString())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
