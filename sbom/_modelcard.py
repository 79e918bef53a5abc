"""Model-card facts read from an ONNX graph, without loading external weights.

Invariants of :class:`ModelCardFacts`:

* every fact comes from the graph itself (``onnx.load(..., load_external_data=False)``), so a
  model with 10 GB of external weights costs the size of its ``.onnx`` protobuf, not 10 GB;
* the parameter count is the sum of element counts of all initializers (dense: product of dims;
  sparse: number of stored values) plus the weight-typed values of ``Constant`` nodes
  (floating and quantized types, ``value_float(s)``; not int32/int64/bool/string shape and
  index constants), subgraphs (If/Loop/Scan bodies) included: exporters often put every
  weight in ``Constant`` nodes or in If branches (silero-vad, PaddleOCR exports). A scalar
  float constant (an epsilon) counts as one parameter;
* ``precision`` lists the weight precisions that hold at least 1% of floating/quantized
  initializer elements, by decreasing share, plus the precision implied by quantization
  operators (QuantizeLinear/DequantizeLinear/QLinear*/MatMulInteger/...). Mixed is normal:
  ``("fp32", "int8")`` is a model with fp32 weights quantized at run time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ota.sbom._common import (
    DEFAULT_LIMITS,
    P_DTYPE_PARAMS,
    P_GRAPH,
    P_INPUT,
    P_IR_VERSION,
    P_NODES,
    P_OP,
    P_OPSET,
    P_OUTPUT,
    P_PARAMETERS,
    P_PRECISION,
    P_PRODUCER,
    P_PRODUCER_VERSION,
    P_QUANTIZED,
    SbomError,
    SbomLimits,
    canonical_json,
)

if TYPE_CHECKING:
    import onnx

Dim = int | str

# TensorProto data type name -> dtype name used in signatures (numpy spelling where one exists).
_DTYPE_NAMES = {
    "FLOAT": "float32",
    "DOUBLE": "float64",
    "FLOAT16": "float16",
    "BFLOAT16": "bfloat16",
}
# TensorProto data type name -> weight precision class; absent types (int32, int64, bool,
# string, ...) are indices or shapes, not weights, and take no part in precision detection.
_PRECISION = {
    "DOUBLE": "fp64", "FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16",
    "FLOAT8E4M3FN": "fp8", "FLOAT8E4M3FNUZ": "fp8", "FLOAT8E5M2": "fp8", "FLOAT8E5M2FNUZ": "fp8",
    "FLOAT8E8M0": "fp8", "FLOAT6E2M3": "fp6", "FLOAT6E3M2": "fp6", "FLOAT4E2M1": "fp4",
    "INT16": "int16", "UINT16": "int16", "INT8": "int8", "UINT8": "int8",
    "INT4": "int4", "UINT4": "int4", "INT2": "int2", "UINT2": "int2",
}  # fmt: skip
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_INT_OPS = frozenset({
    "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QGemm", "QAttention",
    "QEmbedLayerNormalization",
})  # fmt: skip
_NBIT_OPS = {"MatMulNBits": 4, "MatMulBnb4": 4, "GatherBlockQuantized": 4}
_MIN_SHARE = 0.01
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output. ``shape`` is None when the rank is unknown; a symbolic
    dimension is its name (``"N"``), an unknown one ``"?"``."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }

    def signature(self) -> str:
        """Human form, e.g. ``x: float32[N,8]``."""
        dims = "?" if self.shape is None else ",".join(str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    @classmethod
    def from_dict(cls, doc: object) -> TensorInfo:
        """Raises: SbomError: not a tensor description."""
        if not isinstance(doc, dict) or set(doc) != {"name", "dtype", "shape"}:
            raise SbomError("bad tensor description in model card")
        name, dtype, shape = doc["name"], doc["dtype"], doc["shape"]
        if not isinstance(name, str) or not isinstance(dtype, str):
            raise SbomError("bad tensor name or dtype in model card")
        if shape is None:
            return cls(name, dtype, None)
        if not isinstance(shape, list) or not all(
            isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)) for d in shape
        ):
            raise SbomError(f"bad shape of tensor {name!r} in model card")
        return cls(name, dtype, tuple(shape))


@dataclass(frozen=True)
class ModelCardFacts:
    """What the ONNX graph says about a model (see the module docstring for invariants)."""

    producer_name: str
    producer_version: str
    ir_version: int
    opsets: tuple[tuple[str, int], ...]  # (domain, version), sorted; "" is written "ai.onnx"
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    parameters: int
    precision: tuple[str, ...]
    dtype_parameters: tuple[tuple[str, int], ...]  # (precision class, elements), by count
    quantized: bool
    node_count: int
    op_types: tuple[tuple[str, int], ...]  # top N (op, count), by count then name
    graph_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "producer_name": self.producer_name,
            "producer_version": self.producer_version,
            "ir_version": self.ir_version,
            "opsets": dict(self.opsets),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "parameters": self.parameters,
            "precision": list(self.precision),
            "dtype_parameters": dict(self.dtype_parameters),
            "quantized": self.quantized,
            "node_count": self.node_count,
            "op_types": dict(self.op_types),
            "graph_name": self.graph_name,
        }

    def to_properties(self) -> list[tuple[str, str]]:
        """Name/value pairs for CycloneDX ``properties`` (order is significant for I/O)."""
        return [
            (P_GRAPH, self.graph_name),
            (P_PRODUCER, self.producer_name),
            (P_PRODUCER_VERSION, self.producer_version),
            (P_IR_VERSION, str(self.ir_version)),
            *((P_OPSET, f"{d}={v}") for d, v in self.opsets),
            *((P_INPUT, canonical_json(t.to_dict()).decode()) for t in self.inputs),
            *((P_OUTPUT, canonical_json(t.to_dict()).decode()) for t in self.outputs),
            (P_PARAMETERS, str(self.parameters)),
            *((P_PRECISION, p) for p in self.precision),
            *((P_DTYPE_PARAMS, f"{p}={n}") for p, n in self.dtype_parameters),
            (P_QUANTIZED, "true" if self.quantized else "false"),
            (P_NODES, str(self.node_count)),
            *((P_OP, f"{op}={n}") for op, n in self.op_types),
        ]

    @classmethod
    def from_properties(cls, props: Sequence[tuple[str, str]]) -> ModelCardFacts:
        """Rebuild the facts written by :meth:`to_properties`; unknown names are ignored.

        Raises:
            SbomError: a required fact is missing or malformed.
        """
        one: dict[str, str] = {}
        many: dict[str, list[str]] = {}
        for name, value in props:
            one.setdefault(name, value)
            many.setdefault(name, []).append(value)
        try:
            return cls(
                producer_name=one.get(P_PRODUCER, ""),
                producer_version=one.get(P_PRODUCER_VERSION, ""),
                ir_version=int(one[P_IR_VERSION]),
                opsets=tuple(_pair(v) for v in many.get(P_OPSET, [])),
                inputs=tuple(TensorInfo.from_dict(json.loads(v)) for v in many.get(P_INPUT, [])),
                outputs=tuple(TensorInfo.from_dict(json.loads(v)) for v in many.get(P_OUTPUT, [])),
                parameters=int(one[P_PARAMETERS]),
                precision=tuple(many.get(P_PRECISION, [])),
                dtype_parameters=tuple(_pair(v) for v in many.get(P_DTYPE_PARAMS, [])),
                quantized=one.get(P_QUANTIZED) == "true",
                node_count=int(one[P_NODES]),
                op_types=tuple(_pair(v) for v in many.get(P_OP, [])),
                graph_name=one.get(P_GRAPH, ""),
            )
        except (KeyError, ValueError, RecursionError) as e:
            raise SbomError(f"model card properties are incomplete or malformed: {e}") from e


def _pair(value: str) -> tuple[str, int]:
    key, sep, count = value.rpartition("=")
    if not sep or not key:
        raise ValueError(f"expected 'name=count', got {value!r:.80}")
    return key, int(count)


def model_card(
    model_path: Path, *, top_n: int = 10, limits: SbomLimits = DEFAULT_LIMITS
) -> ModelCardFacts:
    """Read the model-card facts of the ONNX model at ``model_path``.

    Only the graph is read (a file of at most ``limits.max_model_bytes``), its weights skipped
    by ``seek`` (``ota.repository._stream.read_skeleton``); external-data files are neither
    opened nor required; tensors are counted from the declared dims.

    Raises:
        SbomError: the file is missing, not a regular file, larger than the limit, not an ONNX
            protobuf, declares negative dims or unknown element types, or nests subgraphs deeper
            than the limit.
    """
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    if not Path(model_path).is_file():  # before open(): a FIFO would block it
        raise SbomError(f"model {model_path} is not a regular file")
    from ota.repository._stream import SkeletonError, read_skeleton

    try:
        size = Path(model_path).stat().st_size
    except OSError as e:
        raise SbomError(f"cannot read model {model_path}: {e.strerror or e}") from e
    if size > limits.max_model_bytes:
        raise SbomError(
            f"model {model_path} exceeds the limit of {limits.max_model_bytes} bytes",
            remedy="store the weights as ONNX external data, or raise the model size limit",
        )
    try:  # issue 13: the graph without its weights (dims and types are all the card needs)
        model = read_skeleton(Path(model_path))
    except OSError as e:
        raise SbomError(f"cannot read model {model_path}: {e.strerror or e}") from e
    except (SkeletonError, DecodeError, ValueError, RuntimeError) as e:
        raise SbomError(f"{model_path} is not an ONNX model: {e}") from e
    try:
        return _facts(model, top_n, limits)
    except ValueError as e:  # protobuf enums: an element type this onnx does not know
        raise SbomError(f"{model_path} is a malformed ONNX model: {e}") from e


def _facts(model: onnx.ModelProto, top_n: int, limits: SbomLimits) -> ModelCardFacts:
    import onnx

    graph = model.graph
    init_names = {t.name for t in graph.initializer} | {
        s.values.name for s in graph.sparse_initializer
    }
    elements: Counter[str] = Counter()  # TensorProto type name -> elements
    ops: Counter[str] = Counter()
    quant: set[str] = set()
    parameters = 0
    nodes = 0
    for g in _graphs(graph, limits.max_graph_depth):
        dtypes = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in g.initializer}
        for t in g.initializer:
            n = _elements(t.dims, t.name)
            parameters += n
            elements[dtypes[t.name]] += n
        for s in g.sparse_initializer:
            n = _elements(s.values.dims, s.values.name)
            parameters += n
            elements[onnx.TensorProto.DataType.Name(s.values.data_type)] += n
        for node in g.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                for type_name, n in _constant_weights(node):
                    parameters += n
                    elements[type_name] += n
                    dtypes[node.output[0]] = type_name
        for node in g.node:
            nodes += 1
            domain = node.domain
            ops[node.op_type if domain in _DEFAULT_DOMAINS else f"{domain}:{node.op_type}"] += 1
            q = _quant_precision(node, dtypes)
            if q:
                quant.add(q)
    by_class: Counter[str] = Counter()
    for type_name, n in elements.items():
        if type_name in _PRECISION:
            by_class[_PRECISION[type_name]] += n
    total = sum(by_class.values())
    ranked = sorted(by_class.items(), key=lambda kv: (-kv[1], kv[0]))
    precision = [p for p, n in ranked if total and n / total >= _MIN_SHARE]
    precision += sorted(quant - set(precision))
    return ModelCardFacts(
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        ir_version=model.ir_version,
        opsets=tuple(
            sorted((o.domain if o.domain else "ai.onnx", o.version) for o in model.opset_import)
        ),
        inputs=tuple(_tensor_info(v) for v in graph.input if v.name not in init_names),
        outputs=tuple(_tensor_info(v) for v in graph.output),
        parameters=parameters,
        precision=tuple(precision),
        dtype_parameters=tuple(ranked),
        quantized=bool(quant),
        node_count=nodes,
        op_types=tuple(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))[: max(top_n, 0)]),
        graph_name=graph.name,
    )


def _graphs(graph: onnx.GraphProto, max_depth: int) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph in node attributes (If/Loop/Scan bodies), depth-first."""
    import onnx

    stack = [(graph, 0)]
    while stack:
        g, depth = stack.pop()
        if depth > max_depth:
            raise SbomError(f"subgraphs nested deeper than {max_depth}")
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append((attr.g, depth + 1))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend((sub, depth + 1) for sub in attr.graphs)


def _constant_weights(node: onnx.NodeProto) -> list[tuple[str, int]]:
    """(TensorProto type name, elements) of a ``Constant`` node's value when it is a weight:
    a tensor (dense or sparse) of a weight precision, or ``value_float(s)``. Integer shape and
    index constants (int32/int64/bool/string) are not weights and give nothing."""
    import onnx

    found: list[tuple[str, int]] = []
    if len(node.output) != 1:  # malformed (onnx.checker refuses it): names no value
        return found
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            type_name = onnx.TensorProto.DataType.Name(attr.t.data_type)
            if type_name in _PRECISION:
                found.append((type_name, _elements(attr.t.dims, node.output[0])))
        elif attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
            values = attr.sparse_tensor.values
            type_name = onnx.TensorProto.DataType.Name(values.data_type)
            if type_name in _PRECISION:
                found.append((type_name, _elements(values.dims, node.output[0])))
        elif attr.name == "value_float":
            found.append(("FLOAT", 1))
        elif attr.name == "value_floats":
            found.append(("FLOAT", len(attr.floats)))
    return found


def _elements(dims: Sequence[int], name: str) -> int:
    n = 1
    for d in dims:
        if d < 0:
            raise SbomError(f"initializer {name!r} declares a negative dimension")
        n *= d
    return n


def _quant_precision(node: onnx.NodeProto, init_dtypes: dict[str, str]) -> str | None:
    """The integer precision a quantization operator implies, or None for other operators."""
    op = node.op_type
    if op in _QDQ_OPS:
        for attr in node.attribute:  # opset 21: QuantizeLinear(output_dtype=...)
            if attr.name == "output_dtype" and attr.i:
                import onnx

                return _PRECISION.get(onnx.TensorProto.DataType.Name(attr.i), "int8")
        candidates = list(node.input[2:3])
        if op == "DequantizeLinear":
            candidates += list(node.input[:1])
        for name in candidates:
            if name in init_dtypes:
                return _PRECISION.get(init_dtypes[name], "int8")
        return "int8"  # QuantizeLinear's default output type is uint8
    if op in _NBIT_OPS:
        bits = next((a.i for a in node.attribute if a.name == "bits" and a.i), _NBIT_OPS[op])
        return f"int{bits}"
    if op in _INT_OPS or op.startswith(("QLinear", "QOrdered")):
        return "int8"
    return None


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    import onnx

    t = value.type
    kind = t.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tt = t.tensor_type if kind == "tensor_type" else t.sparse_tensor_type
        type_name = onnx.TensorProto.DataType.Name(tt.elem_type)
        dtype = _DTYPE_NAMES.get(type_name, type_name.lower())
        if kind == "sparse_tensor_type":
            dtype = f"sparse<{dtype}>"
        shape: tuple[Dim, ...] | None = None
        if tt.HasField("shape"):
            shape = tuple(_dim(d) for d in tt.shape.dim)
        return TensorInfo(value.name, dtype, shape)
    return TensorInfo(value.name, (kind or "unknown").removesuffix("_type"), None)


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    which = d.WhichOneof("value")
    if which == "dim_value":
        return int(d.dim_value)
    if which == "dim_param" and d.dim_param:
        return str(d.dim_param)
    return "?"
