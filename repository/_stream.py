"""Read the structure of an ONNX model without reading its weights (publisher side).

A float32 model is almost all ``TensorProto.raw_data``. ``onnx.load`` reads the whole file and
then parses it (two copies of the weights in memory: 2.2 GB and 6.6 s for the checks of a 1 GB
model here); the static checks, the model card and onnxruntime need only the graph and where
the weights are. :func:`read_skeleton` walks the protobuf wire format of the file with ``seek``
and keeps every field verbatim except the ``raw_data`` of large tensors, which it replaces by an
external-data reference into the model file itself (``location`` = the file's name, ``offset``
and ``length`` of the bytes it skipped, ``data_location = EXTERNAL``).

Invariants:

* the skeleton equals ``onnx.load_model(path, load_external_data=False)`` except that each
  tensor found on the known paths (graph and subgraph initializers, sparse initializers, tensor
  attributes of nodes, functions, training graphs) whose ``raw_data`` is at least
  ``DESCEND_MIN`` bytes inside a message of at least ``DESCEND_MIN`` bytes has, instead of that
  ``raw_data``, a reference to exactly those bytes of the file; everything else, unknown fields
  included, is byte-for-byte the file's;
* the file is read once, by ``seek`` over the skipped bytes: memory is the size of the graph
  without its large weights, plus one message under descent;
* a malformed file (bad varint, a length past its parent's end, a group wire type, nesting deeper
  than ``max_depth``) raises :class:`SkeletonError` (a :class:`ValueError`) before protobuf sees
  it; protobuf's own parse errors pass through for the caller to report;
* :func:`checker_view` refuses a weight whose bytes are fewer than its shape and type need (the
  rule ``onnx.checker`` applies to ``raw_data``) before handing the checker empty weights.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ota.client._smoke_child import encode_varint

if TYPE_CHECKING:
    import onnx

__all__ = ["SkeletonError", "read_skeleton", "skeleton_bytes"]

# Messages smaller than this are copied whole: whatever weights they hold are small.
DESCEND_MIN = 4096
MAX_DEPTH = 64

# message kind -> {field number: kind of the sub-message at that field}. "raw" marks the
# TensorProto field that is stripped. Field numbers are onnx.proto's (ONNX IR v10).
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNC, _TRAIN = range(8)
_RAW = -1
_SCHEMA: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 25: _FUNC, 20: _TRAIN},
    _TRAIN: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNC: {7: _NODE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {9: _RAW},
}


class SkeletonError(ValueError):
    """The file is not a well-formed protobuf message (truncated, bad lengths, too deep)."""


def read_skeleton(path: Path, *, max_depth: int = MAX_DEPTH) -> onnx.ModelProto:
    """The model at ``path`` with the ``raw_data`` of its large tensors emptied (see module).

    Raises:
        SkeletonError: the wire format is malformed or nests deeper than ``max_depth``.
        OSError: the file cannot be read.
        google.protobuf.message.DecodeError: the skeleton is not a ``ModelProto``.
    """
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(skeleton_bytes(path, max_depth=max_depth))
    return model


def skeleton_bytes(path: Path, *, max_depth: int = MAX_DEPTH) -> bytes:
    """The serialized skeleton of the ``ModelProto`` file at ``path`` (see :func:`read_skeleton`).

    Raises:
        SkeletonError: malformed wire format. OSError: the file cannot be read.
    """
    with open(path, "rb", buffering=1 << 16) as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        return _message(f, size, _MODEL, max_depth, Path(path).name.encode())


def _message(f: BinaryIO, length: int, kind: int, depth: int, location: bytes) -> bytes:
    """Re-encode the ``length`` bytes at ``f``'s position as message ``kind``, stripped."""
    if depth < 0:
        raise SkeletonError("messages nested too deeply")
    schema = _SCHEMA[kind]
    out = bytearray()
    end = f.tell() + length
    stripped: tuple[int, int] | None = None
    while (pos := f.tell()) < end:
        tag, tag_bytes = _varint(f, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise SkeletonError(f"field number 0 at byte {pos}")
        if wire == 0:
            _, value = _varint(f, end)
            out += tag_bytes + value
        elif wire in (1, 5):
            out += tag_bytes + _read(f, 8 if wire == 1 else 4, end)
        elif wire == 2:
            n, _ = _varint(f, end)
            if n > end - f.tell():
                raise SkeletonError(f"field {field} at byte {pos} runs past its message")
            sub = schema.get(field)
            if sub == _RAW and n >= DESCEND_MIN:
                stripped = (f.tell(), n)
                f.seek(n, io.SEEK_CUR)
            else:
                out += tag_bytes + _submessage(f, n, end, sub, depth, location)
        else:
            raise SkeletonError(f"unsupported wire type {wire} at byte {pos}")
    if f.tell() != end:
        raise SkeletonError("a field runs past the end of its message")
    if stripped is not None:
        out += _external_ref(location, *stripped)
    return bytes(out)


def _external_ref(location: bytes, offset: int, length: int) -> bytes:
    """TensorProto fields saying "the data is ``length`` bytes at ``offset`` of ``location``":
    ``external_data`` (13) entries and ``data_location`` (14) = EXTERNAL."""
    out = bytearray()
    for key, value in ((b"location", location), (b"offset", b"%d" % offset),
                       (b"length", b"%d" % length)):  # fmt: skip
        entry = _field(1, key) + _field(2, value)
        out += _field(13, entry)
    out += b"\x70\x01"  # field 14, varint: EXTERNAL
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(data)) + data


def _submessage(
    f: BinaryIO, n: int, end: int, sub: int | None, depth: int, location: bytes
) -> bytes:
    """Length and body of a length-delimited field: descended into when it is a known
    message kind and large, copied verbatim otherwise."""
    if sub is not None and sub != _RAW and n >= DESCEND_MIN:
        body = _message(f, n, sub, depth - 1, location)
        return _encode_varint(len(body)) + body
    return _encode_varint(n) + _read(f, n, end)


def _read(f: BinaryIO, n: int, end: int) -> bytes:
    if n > end - f.tell():
        raise SkeletonError("truncated field")
    data = f.read(n)
    if len(data) != n:
        raise SkeletonError("file truncated")
    return data


def _varint(f: BinaryIO, end: int) -> tuple[int, bytes]:
    """One varint: its value and its bytes as read."""
    raw = bytearray()
    value = 0
    for shift in range(0, 70, 7):
        if f.tell() >= end:
            raise SkeletonError("truncated varint")
        b = f.read(1)
        if not b:
            raise SkeletonError("file truncated in a varint")
        raw += b
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value, bytes(raw)
    raise SkeletonError("varint longer than 10 bytes")


# one protobuf varint encoder for both skeleton writers (the device's smoke child is the other)
_encode_varint = encode_varint


def stripped_tensors(model: onnx.ModelProto, location: str | None) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model`` whose data the skeleton left in the model file itself (external
    data at ``location``, the model file's name; every external tensor when None):
    initializers, sparse initializers and tensor attributes, in subgraphs and functions too."""
    import onnx

    stack: list[onnx.GraphProto] = [model.graph]
    stack.extend(g for t in model.training_info for g in (t.initialization, t.algorithm))
    nodes: list[onnx.NodeProto] = [n for fn in model.functions for n in fn.node]
    tensors: list[onnx.TensorProto] = []
    while stack or nodes:
        if stack:
            graph = stack.pop()
            tensors.extend(graph.initializer)
            tensors.extend(s.values for s in graph.sparse_initializer)
            tensors.extend(s.indices for s in graph.sparse_initializer)
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            for sparse in (*attr.sparse_tensors, *([attr.sparse_tensor] if attr.HasField(
                    "sparse_tensor") else [])):  # fmt: skip
                tensors.extend((sparse.values, sparse.indices))
            if attr.HasField("g"):
                stack.append(attr.g)
            stack.extend(attr.graphs)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL and (
            location is None
            or any(e.key == "location" and e.value == location for e in t.external_data)
        ):
            yield t


def checker_view(model: onnx.ModelProto, location: str | None = None) -> onnx.ModelProto:
    """A copy of the skeleton ``model`` that ``onnx.checker`` can check without the weights.

    ``onnx.checker`` wants either the weight bytes (it compares ``raw_data``'s length with the
    shape) or an external file relative to the current folder. So each tensor stripped by the
    skeleton (``location``: the model file's name; None: every external tensor, whose files the
    caller has checked) becomes an empty tensor of the same name, type and rank (every
    dimension 0) after its length was checked here as the checker would: at least
    ``elements * itemsize`` bytes (when a length is given).

    Raises:
        SkeletonError: a stripped tensor holds fewer bytes than its shape and type need.
    """
    import onnx

    view = onnx.ModelProto()
    view.CopyFrom(model)
    for t in stripped_tensors(view, location):
        length = next((e.value for e in t.external_data if e.key == "length"), "")
        need = _nbytes(t)
        if need is not None and length.isdigit() and int(length) < need:
            raise SkeletonError(
                f"tensor {t.name!r}: raw_data holds {length} bytes, its shape and type need {need}"
            )
        rank = len(t.dims)
        del t.dims[:]
        t.dims.extend([0] * rank)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = b""
    return view


def _nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes the tensor's shape and type need, or None where we do not know the element size."""
    from onnx import helper

    elements = 1
    for d in t.dims:
        elements *= max(int(d), 0)
    name = helper.tensor_dtype_to_string(t.data_type)
    if name.endswith(("INT4", "FLOAT4E2M1")):
        return (elements + 1) // 2
    if name.endswith("INT2"):
        return (elements + 3) // 4
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if name.endswith("STRING") or itemsize <= 0:
        return None
    return elements * itemsize


def ort_session(model_path: Path, options: Any) -> Any:
    """An onnxruntime ``InferenceSession`` of the model at ``model_path`` that maps the weights
    from the file instead of copying them: the session is built from the skeleton, whose
    weights are external data in the model file itself, with the model's folder as the
    external-data folder. onnxruntime maps external data into memory (page-cache pages shared
    with the chunker), so the session costs no parse of the weights and no copy of them beside
    the prepacked ones (which devices compute too, and which change the outputs by up to 0.3%
    when disabled: kept); onnxruntime drops the mapped originals once packed. ``options`` is an
    ``onnxruntime.SessionOptions``, changed in place.

    Raises:
        SkeletonError, OSError: the file cannot be read as a protobuf.
        Exception: whatever onnxruntime raises for a model it cannot load.
    """
    import onnxruntime as ort

    path = Path(model_path)
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(path.resolve().parent)
    )
    return ort.InferenceSession(skeleton_bytes(path), options, providers=["CPUExecutionProvider"])
