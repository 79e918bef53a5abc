"""Static checks of an ONNX model before it is published (publisher side, needs ``onnx``).

The checks run on the file as the operator gave it, without executing it and without reading
weights into memory: the graph is read by ``ota.repository._stream.read_skeleton`` (the weights
stay in the file; issue 13) and ``onnx.checker`` checks a view of it in which every weight is an
empty tensor of its type and rank, its byte length checked against its shape beforehand (so
models over 2 GB and external data work). Refusals are
:class:`ModelRejected` (an :class:`~ota.errors.InputError`): the operator must fix the model.

Invariants of an accepted model (what :func:`check_model` guarantees when it returns):

* the file is an ONNX ``ModelProto`` with a valid graph (``onnx.checker``, ``full_check=False``);
* its default-domain opset lies in ``[min_opset, max_opset]``;
* every external-data ``location`` is a relative path without ``..``, names an existing regular
  file (not a symlink) inside the model's folder, and every ``offset + length`` lies in that file;
* the model file plus its external-data files total at most ``max_bytes``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
import onnx.defs
from onnx import helper

from ota.errors import InputError
from ota.repository._stream import SkeletonError, checker_view, read_skeleton

__all__ = [
    "DEFAULT_MAX_OPSET",
    "DEFAULT_MIN_OPSET",
    "Dim",
    "ModelFacts",
    "ModelRejected",
    "TensorSig",
    "check_model",
]

DEFAULT_MIN_OPSET = 7  # the oldest opset onnxruntime still loads
DEFAULT_MAX_OPSET = onnx.defs.onnx_opset_version()
_MAX_EXTERNAL_FILES = 4096

Dim = int | str | None
"""One dimension of a tensor shape: a fixed size, a symbolic name, or unknown (``None``)."""


class ModelRejected(InputError):
    """The model failed a static check; the message names the check and the figures."""


@dataclass(frozen=True)
class TensorSig:
    """Name, element type and shape of one graph input or output.

    ``dtype`` is the numpy dtype name (``"float32"``) for tensors whose element type numpy can
    hold, the ONNX element type name (``"BFLOAT16"``) otherwise, and the ONNX type's
    text (``"sequence"``, ``"map"``, ``"optional"``) for non-tensor values. ``shape`` is
    ``None`` when the rank is unknown.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None


@dataclass(frozen=True)
class ModelFacts:
    """What the static checks learned about an accepted model.

    ``total_size`` is the model file plus its distinct external-data files, in bytes.
    ``external_files`` are the external-data paths relative to the model's folder, POSIX
    separators, sorted and unique.
    """

    opset: int
    ir_version: int
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    total_size: int
    model_size: int
    external_files: tuple[str, ...]
    opset_imports: tuple[tuple[str, int], ...]
    producer: str


def check_model(
    path: Path,
    *,
    max_bytes: int,
    min_opset: int = DEFAULT_MIN_OPSET,
    max_opset: int = DEFAULT_MAX_OPSET,
) -> ModelFacts:
    """Statically check the ONNX model at ``path`` and describe it.

    Order: size of the model file, protobuf parse (graph only), external-data locations and
    sizes, total size, opset range, then ``onnx.checker`` by path. Weights are never loaded.

    Raises:
        ModelRejected: the file is missing, not an ONNX model, truncated, invalid, its opset is
            out of range, it (with its external data) exceeds ``max_bytes``, or an external-data
            reference is absolute, contains ``..``, leaves the model folder (also through a
            symlink), is a symlink, is missing, or points past the end of its file.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise ModelRejected(f"model {path} is not a regular file")
        model_size = path.stat().st_size
    except OSError as e:
        raise ModelRejected(f"cannot read model {path}: {e.strerror or e}") from e
    if model_size > max_bytes:
        raise ModelRejected(f"model {path.name} is {model_size} bytes, over the {max_bytes} budget")
    model = _parse(path)
    # The skeleton leaves the weights in the file: a view with them as empty tensors (lengths
    # checked) for the external-data checks and onnx.checker (issue 13: no weight copies).
    view = _checker_view(model, path.name)
    folder = path.parent.resolve()
    external = _external_files(view, folder)
    total = model_size + sum(external.values())
    if total > max_bytes:
        raise ModelRejected(
            f"model {path.name} with external data is {total} bytes, over the {max_bytes} budget"
        )
    opsets = tuple(sorted((o.domain or "", int(o.version)) for o in model.opset_import))
    default = [v for d, v in opsets if d in ("", "ai.onnx")]
    if not default:
        raise ModelRejected(f"model {path.name} imports no default-domain opset")
    opset = max(default)
    if not min_opset <= opset <= max_opset:
        raise ModelRejected(
            f"model {path.name} uses opset {opset}, outside the accepted {min_opset}..{max_opset}"
        )
    try:
        onnx.checker.check_model(_checker_view(view, None), full_check=False)
    except (onnx.checker.ValidationError, ValueError, OSError) as e:
        raise ModelRejected(f"model {path.name} is invalid: {_one_line(e)}") from e
    initializers = {t.name for t in model.graph.initializer}
    return ModelFacts(
        opset=opset,
        ir_version=int(model.ir_version),
        inputs=tuple(_sig(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(_sig(v) for v in model.graph.output),
        total_size=total,
        model_size=model_size,
        external_files=tuple(sorted(external)),
        opset_imports=opsets,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
    )


def _parse(path: Path) -> onnx.ModelProto:
    try:
        model = read_skeleton(path)  # issue 13: the graph without its weights
    except Exception as e:  # protobuf's DecodeError and friends share no useful base class
        raise ModelRejected(
            f"{path.name} is not an ONNX model (truncated or not a protobuf): {_one_line(e)}"
        ) from e
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelRejected(f"{path.name} is not an ONNX model (no IR version or no graph)")
    return model


def _checker_view(model: onnx.ModelProto, location: str | None) -> onnx.ModelProto:
    try:
        return checker_view(model, location)
    except SkeletonError as e:
        raise ModelRejected(f"model is invalid: {_one_line(e)}") from e


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor that may carry external data: initializers, also in subgraphs, and
    tensor-valued attributes (``Constant`` nodes)."""
    found: list[onnx.TensorProto] = []
    stack = [model.graph]
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                stack.extend(attr.graphs)
                if attr.HasField("g"):
                    stack.append(attr.g)
    while stack:
        graph = stack.pop()
        found.extend(graph.initializer)
        found.extend(s.values for s in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    found.append(attr.t)
                found.extend(attr.tensors)
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return found


def _external_files(model: onnx.ModelProto, folder: Path) -> dict[str, int]:
    """Map each external-data location (relative, POSIX) to its file size, checking each."""
    sizes: dict[str, int] = {}
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        rel = _safe_location(location, tensor.name)
        if rel not in sizes:
            if len(sizes) >= _MAX_EXTERNAL_FILES:
                raise ModelRejected(f"more than {_MAX_EXTERNAL_FILES} external-data files")
            sizes[rel] = _external_size(folder, rel, tensor.name)
        offset = _int_field(info.get("offset", "0"), tensor.name, "offset")
        length = _int_field(info.get("length", "0"), tensor.name, "length")
        if offset + length > sizes[rel]:
            raise ModelRejected(
                f"external data of tensor {tensor.name!r} ends at byte {offset + length}, "
                f"past the end of {rel} ({sizes[rel]} bytes)"
            )
    return sizes


def _safe_location(location: str, tensor: str) -> str:
    if not location or "\x00" in location:
        raise ModelRejected(f"tensor {tensor!r} has external data without a location")
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location.startswith("\\"):
        raise ModelRejected(
            f"external data of tensor {tensor!r} has an absolute location {location!r:.120}"
        )
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise ModelRejected(
            f"external data of tensor {tensor!r} leaves the model folder: {location!r:.120}"
        )
    return "/".join(p for p in parts if p not in ("", "."))


def _external_size(folder: Path, rel: str, tensor: str) -> int:
    candidate = folder / rel
    resolved = candidate.resolve()
    if not resolved.is_relative_to(folder):
        raise ModelRejected(
            f"external data of tensor {tensor!r} resolves outside the model folder: {rel!r}"
        )
    try:
        if candidate.is_symlink():
            raise ModelRejected(f"external data file {rel} of tensor {tensor!r} is a symlink")
        st = os.stat(candidate, follow_symlinks=False)
    except FileNotFoundError as e:
        raise ModelRejected(f"external data file {rel} of tensor {tensor!r} is missing") from e
    except OSError as e:
        raise ModelRejected(f"cannot read external data file {rel}: {e.strerror or e}") from e
    if not candidate.is_file():
        raise ModelRejected(f"external data {rel} of tensor {tensor!r} is not a regular file")
    return st.st_size


def _int_field(value: str, tensor: str, what: str) -> int:
    if not value.isdigit() or len(value) > 20:
        raise ModelRejected(f"external data of tensor {tensor!r} has a bad {what} {value!r:.40}")
    return int(value)


def _sig(value: onnx.ValueInfoProto) -> TensorSig:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSig(value.name, kind.removesuffix("_type") if kind else "unknown", None)
    tt = value.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = onnx.TensorProto.DataType.Name(tt.elem_type)
    if dtype == "object":
        dtype = "str"
    if not tt.HasField("shape"):
        return TensorSig(value.name, dtype, None)
    dims: list[Dim] = []
    for d in tt.shape.dim:
        which = d.WhichOneof("value")
        dims.append(d.dim_value if which == "dim_value" else d.dim_param if which else None)
    return TensorSig(value.name, dtype, tuple(dims))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__
