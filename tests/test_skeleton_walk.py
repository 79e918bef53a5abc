"""Attacks on the smoke child's skeleton walker (review of issue 13, ADR 0008).

The walker parses the model file by hand. The file passed the signature check, but signed is
not well-formed: whatever it holds, the walk must read only inside the file, stay within a
memory bound set by the skeleton's size cap (never a multiple of the file), give up after a
bounded number of fields, and every external-data reference it writes must name a range of
the file's own bytes, disjoint from the others. Anything else is None (load by path).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from ota.client import _smoke_child as child
from tests.onnx_models import save, write_mlp

_tag, _varint = child._tag, child._varint


def _len_field(field: int, payload: bytes) -> bytes:
    return _tag(field, child._LEN) + _varint(len(payload)) + payload


def _peak_bytes(path: Path) -> tuple[bytes | None, int]:
    tracemalloc.start()
    try:
        skel = child.skeleton(str(path))
        return skel, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_heavy_graph_is_refused_before_it_is_copied(tmp_path: Path) -> None:
    """A 16 MB Constant node beside one large initializer: the skeleton would save little, so
    it is None, but it used to be built in full first (three copies of the graph, 50 MB
    for a 16 MB file) and only then compared with its cap: a model near the sandbox's limit
    failed as ``memory`` although it loads by path."""
    model = onnx.load(str(write_mlp(tmp_path / "m.onnx", in_features=200, hidden=300)))
    const = np.ones((4000, 1000), np.float32)  # 16 MB in the graph's nodes
    model.graph.node.append(
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(const, "c"))
    )
    heavy = save(model, tmp_path / "heavy" / "model.onnx")
    skel, peak = _peak_bytes(heavy)
    assert skel is None
    assert peak < 4 * 1024 * 1024, peak  # the cap is 1 MiB here; the file is 16 MB


def test_unpacked_repeated_fields_in_a_tensor_are_not_listed(tmp_path: Path) -> None:
    """A tensor with 64 KiB of raw_data then 400 000 unpacked int64_data fields (2 bytes
    each: 0.8 MB): the walker listed every field as a tuple (about 60 MB), 75 times the
    file, before looking at them."""
    tensor = (
        _len_field(8, b"w")  # name
        + _tag(2, child._VARINT) + _varint(1)  # data_type FLOAT
        + _len_field(9, b"\0" * 65536)  # raw_data
        + (_tag(7, child._VARINT) + _varint(0)) * 400_000  # int64_data, unpacked
    )  # fmt: skip
    graph = _len_field(5, tensor) + _len_field(2, b"g")
    path = tmp_path / "model.onnx"
    path.write_bytes(_tag(1, child._VARINT) + _varint(8) + _len_field(7, graph))
    skel, peak = _peak_bytes(path)
    assert skel is None  # such a tensor is left as it is: nothing else to rewrite
    assert peak < 8 * 1024 * 1024, peak


def test_the_walk_gives_up_after_its_field_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of millions of tiny fields costs a Python iteration each (seconds to minutes on
    a device, inside the smoke's timeout): the walk has a field budget, then loads by path."""
    model = write_mlp(tmp_path / "model.onnx", in_features=200, hidden=300)
    assert child.skeleton(str(model)) is not None
    monkeypatch.setattr(child, "_SKELETON_MAX_FIELDS", 10)
    assert child.skeleton(str(model)) is None


def _external_ranges(skel: bytes, location: str) -> list[tuple[int, int]]:
    parsed = onnx.ModelProto.FromString(skel)
    ranges = []
    for t in parsed.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL and ext.get("location") == location:
            ranges.append((int(ext["offset"]), int(ext["length"])))
    return ranges


@pytest.fixture(scope="module")
def mlp_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("mlp")
    model = write_mlp(folder / "model.onnx", in_features=100, hidden=200, layers=2)
    return model.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_models_never_point_outside_their_own_bytes(
    mlp_bytes: bytes, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Bit flips, cut-outs, insertions and truncations of a real model: the skeleton is None
    or, when protobuf parses it, each of its external references is a disjoint range of at
    least 64 KiB inside the file, holding the bytes of a length-delimited field."""
    buf = bytearray(mlp_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate", "byte"]))
        pos = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte" and buf:
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del buf[pos : pos + data.draw(st.integers(1, 16))]
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del buf[pos:]
    path = tmp_path_factory.mktemp("mut") / "model.onnx"
    path.write_bytes(bytes(buf))
    skel = child.skeleton(str(path))
    if skel is None:
        return
    assert len(skel) <= max(1024 * 1024, len(buf) // 16)
    try:
        ranges = _external_ranges(skel, "model.onnx")
    except Exception:  # protobuf refuses it: so would onnxruntime, which then loads by path
        return
    ranges.sort()
    for (start, length), nxt in zip(ranges, [*ranges[1:], None], strict=True):
        assert length >= 64 * 1024 and start >= 0 and start + length <= len(buf)
        if nxt is not None:
            assert start + length <= nxt[0]
        # the range is the value of a length-delimited field: its length prefix precedes it
        assert bytes(buf[start - len(_varint(length)) : start]) == _varint(length)
