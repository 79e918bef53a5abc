"""Streaming publish (issue 13): the model's weights are read once, for chunking and hashing,
and never copied for the checks, the model card or the golden run. What must not change is
checked against independent references: the chunker against FastCDC over the whole file, the
skeleton against ``onnx.load``, the golden outputs against an onnxruntime session by path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastcdc import fastcdc
from onnx import TensorProto, helper, numpy_helper

from ota.bundle import FileEntry, Manifest, blob_key
from ota.repository import PublishRequest, publish
from ota.repository._chunker import (
    _RELEASE,
    AVG_CHUNK,
    MAX_CHUNK,
    MIN_CHUNK,
    Uploader,
    chunk_file,
)
from ota.repository._golden import make_smoke_files, read_npz
from ota.repository._index import load_manifest
from ota.repository._model_checks import ModelRejected, check_model
from ota.repository._storage import FileStorage
from ota.repository._stream import (
    DESCEND_MIN,
    SkeletonError,
    checker_view,
    read_skeleton,
    stripped_tensors,
)
from ota.repository._txn import Transaction
from ota.sbom import model_card
from tests.onnx_models import big_mlp, mlp, save
from tests.repo_helpers import make_project


def _reference_chunks(data: bytes) -> list[tuple[str, int]]:
    """FastCDC over the whole file in memory (the library's own generator, ``fat``), the
    chunker's parameters: what the streaming chunker must reproduce."""
    return [
        (hashlib.sha256(c.data).hexdigest(), c.length)
        for c in fastcdc(data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK, fat=True)
    ]


def _entry_chunks(entry: FileEntry) -> list[tuple[str, int]]:
    return [(c.sha256, c.size) for c in entry.chunks]


def test_chunker_matches_fastcdc_over_the_whole_file(tmp_path: Path) -> None:
    # Larger than the release window, so pages are dropped behind the chunker several times.
    data = np.random.default_rng(7).bytes(3 * _RELEASE + 12345)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    store = FileStorage(tmp_path / "store")
    with Uploader(store) as up:
        entry = chunk_file(src, "model/blob.bin", up)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.size == len(data)
    assert _entry_chunks(entry) == _reference_chunks(data)
    assert len(entry.chunks) > 10
    offset = 0
    for c in entry.chunks:  # every stored blob holds exactly its bytes of the file
        blob, _ = store.get(blob_key(c.sha256))
        assert blob == data[offset : offset + c.size]
        offset += c.size


def test_published_manifest_matches_the_chunker_reference(tmp_path: Path) -> None:
    model = save(big_mlp(6), tmp_path / "models" / "m.onnx")
    project = make_project(tmp_path)
    publish(project, PublishRequest(source=model, name="m", version="1.0.0"))
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    manifest: Manifest = load_manifest(project.storage, txn, "m", "1.0.0")
    entry = next(f for f in manifest.files if f.path == "model/model.onnx")
    data = model.read_bytes()
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert _entry_chunks(entry) == _reference_chunks(data)
    # ADR 0014: the whole-file blob, written from the chunking pass, is exactly the model
    assert len(entry.chunks) > 1
    assert (tmp_path / "repo" / blob_key(entry.sha256)).read_bytes() == data
    assert not list((tmp_path / "repo").rglob(".file.*"))  # no temp copy left behind


def test_chunker_copy_holds_exactly_the_hashed_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(3).bytes(2 * _RELEASE + 777)
    src, copy = tmp_path / "blob.bin", tmp_path / "copy.new"
    src.write_bytes(data)
    copy.touch()
    entry = chunk_file(src, "model/blob.bin", None, None, copy)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert copy.read_bytes() == data


def test_chunker_copy_that_cannot_be_written_fails_the_file(tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(np.random.default_rng(4).bytes(3 * _RELEASE))  # more chunks than the queue
    with pytest.raises(FileNotFoundError):  # the hashing thread's, and no hang
        chunk_file(src, "model/blob.bin", None, None, tmp_path / "no-such-dir" / "copy.new")


def _model_with_subgraph_and_constant() -> onnx.ModelProto:
    """Weights in an initializer, a Constant node, a sparse initializer and an If branch."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)  # 16 KiB: stripped
    c = rng.standard_normal((64, 64)).astype(np.float32)
    small = np.ones((2,), np.float32)  # under DESCEND_MIN: kept verbatim
    branch_w = rng.standard_normal((64, 64)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "bw"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(branch_w, "bw")],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 64])],
    )
    sparse_vals = numpy_helper.from_array(rng.standard_normal(2048).astype(np.float32), "sv")
    sparse_idx = numpy_helper.from_array(np.arange(2048, dtype=np.int64), "si")
    sparse = helper.make_sparse_tensor(sparse_vals, sparse_idx, [4096])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c")),
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["a", "c"], ["h"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    sp_vals = sparse.values
    sp_vals.name = "sp"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(small, "small"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_skeleton_is_the_graph_with_its_weights_left_in_the_file(tmp_path: Path) -> None:
    path = save(_model_with_subgraph_and_constant(), tmp_path / "m.onnx")
    data = path.read_bytes()
    skeleton = read_skeleton(path)
    full = onnx.load_model(str(path), load_external_data=False)
    # The weights (about 90 KB) stay in the file: the skeleton holds the graph alone.
    assert skeleton.ByteSize() < 4096 < len(data) // 16
    stripped = list(stripped_tensors(skeleton, "m.onnx"))
    # w, the Constant, the If branch's weight and the sparse values; "small" stays inline.
    assert sorted(t.name for t in stripped) == ["bw", "c", "si", "sp", "w"]
    originals = {t.name: t for t in _all_tensors(full)}
    for t in stripped:
        ext = {e.key: e.value for e in t.external_data}
        offset, length = int(ext["offset"]), int(ext["length"])
        assert length >= DESCEND_MIN
        assert data[offset : offset + length] == originals[t.name].raw_data
        # Apart from where its bytes are, the tensor is the file's.
        del t.external_data[:]
        t.ClearField("data_location")
        t.raw_data = originals[t.name].raw_data
    assert skeleton == full


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    found: list[onnx.TensorProto] = []
    stack = [model.graph]
    while stack:
        g = stack.pop()
        found.extend(g.initializer)
        for s in g.sparse_initializer:
            found.extend((s.values, s.indices))
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    found.append(a.t)
                if a.HasField("g"):
                    stack.append(a.g)
    return found


def test_checks_and_model_card_agree_with_a_full_parse(tmp_path: Path) -> None:
    path = save(_model_with_subgraph_and_constant(), tmp_path / "m.onnx")
    facts = check_model(path, max_bytes=1 << 30)
    assert facts.external_files == ()  # the weights left in the model file are not "external"
    assert facts.total_size == path.stat().st_size
    onnx.checker.check_model(str(path), full_check=False)  # the reference checker agrees
    card = model_card(path)
    full = onnx.load(str(path))
    assert card.parameters >= sum(int(np.prod(t.dims)) for t in full.graph.initializer)
    assert [t.name for t in card.inputs] == ["x"]


def test_model_with_external_data_publishes(tmp_path: Path) -> None:
    model = save(mlp(in_features=96, hidden=128, layers=3), tmp_path / "ext" / "model.onnx",
                 external_data=True)  # fmt: skip
    assert (tmp_path / "ext" / "model.onnx.data").stat().st_size > 100_000
    project = make_project(tmp_path)
    publish(project, PublishRequest(source=model, name="ext", version="1.0.0"))
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    manifest = load_manifest(project.storage, txn, "ext", "1.0.0")
    files = {f.path: f for f in manifest.files}
    data = (tmp_path / "ext" / "model.onnx.data").read_bytes()
    entry = files["model/model.onnx.data"]
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert _entry_chunks(entry) == _reference_chunks(data)
    assert not list((tmp_path / "repo").rglob(".file.*"))  # no temp copy left behind
    assert "smoke/golden.npz" in files


def test_golden_outputs_equal_a_session_by_path(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = save(big_mlp(2), tmp_path / "m.onnx")
    spec = make_smoke_files(path, tmp_path)
    inputs = read_npz(tmp_path / spec.inputs)
    golden = read_npz(tmp_path / spec.golden)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for name, value in zip(names, session.run(names, dict(inputs)), strict=True):
        np.testing.assert_allclose(golden[name], value, rtol=1e-6, atol=1e-6)


def test_golden_session_uses_one_thread_without_spinning(tmp_path: Path) -> None:
    # Issue 13: the publish chunks on the other core; a second intra-op thread only spun.
    from ota.repository._golden import _session

    opts = _session(save(big_mlp(1), tmp_path / "m.onnx")).get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_staging_smoke_files_without_fsync_hold_the_same_bytes(tmp_path: Path) -> None:
    # Issue 13: publish writes the smoke files into its private staging folder without an
    # fsync each (the store's barrier makes the stored copies durable): same files, same bytes.
    path = save(big_mlp(1), tmp_path / "m.onnx")
    durable, plain = tmp_path / "durable", tmp_path / "plain"
    spec = make_smoke_files(path, durable)
    assert make_smoke_files(path, plain, durable=False) == spec
    for rel in (spec.inputs, spec.golden):
        assert (plain / rel).read_bytes() == (durable / rel).read_bytes()
    assert sorted(p.name for p in plain.rglob("*")) == sorted(p.name for p in durable.rglob("*"))


def test_weights_shorter_than_their_shape_are_rejected(tmp_path: Path) -> None:
    model = big_mlp(1)
    t = model.graph.initializer[0]
    t.dims[0] += 1  # the raw bytes now hold one row too few
    path = save(model, tmp_path / "short.onnx")
    with pytest.raises(ModelRejected, match="need"):
        check_model(path, max_bytes=1 << 30)
    with pytest.raises(SkeletonError):
        checker_view(read_skeleton(path), "short.onnx")


@pytest.mark.parametrize("cut", [1, 7, 5000, -3])
def test_truncated_or_garbled_files_are_rejected(tmp_path: Path, cut: int) -> None:
    data = save(big_mlp(1), tmp_path / "m.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[:cut] if cut > 0 else data[:cut] + b"\xff\xff\xff")
    with pytest.raises(ModelRejected):
        check_model(bad, max_bytes=1 << 30)


def test_a_length_past_its_message_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    # field 7 (graph), length 2**40: far past the end of a 12-byte file
    bad.write_bytes(b"\x08\x08" + b"\x3a" + b"\x80\x80\x80\x80\x80\x20" + b"abc")
    with pytest.raises(SkeletonError, match="past"):
        read_skeleton(bad)


def test_nesting_deeper_than_the_bound_is_refused(tmp_path: Path) -> None:
    # graph -> node -> attribute(g) -> node ... each level large enough to be descended into
    body = b"\x00" * DESCEND_MIN  # an unknown field 0 would be refused; use a doc_string
    inner = b"\x52" + _varint(len(body)) + body  # GraphProto.doc_string (10), bytes
    for _ in range(70):
        attr = b"\x32" + _varint(len(inner)) + inner  # AttributeProto.g (6)
        node = b"\x2a" + _varint(len(attr)) + attr  # NodeProto.attribute (5)
        inner = b"\x0a" + _varint(len(node)) + node  # GraphProto.node (1)
    bad = tmp_path / "deep.onnx"
    bad.write_bytes(b"\x3a" + _varint(len(inner)) + inner)  # ModelProto.graph (7)
    with pytest.raises(SkeletonError, match="deep"):
        read_skeleton(bad)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _CountingStorage(FileStorage):
    """The real folder storage, counting its barriers (machine-wide ``os.sync``)."""

    barriers = 0

    def barrier(self) -> None:
        self.barriers += 1
        super().barrier()


def test_uploader_syncs_once_after_its_last_chunk(tmp_path: Path) -> None:
    store = _CountingStorage(tmp_path / "store")
    with Uploader(store) as up:
        up.submit(hashlib.sha256(b"a").hexdigest(), b"a")
        up.flush()  # what publish does before its commit
        assert store.barriers == 1
    assert store.barriers == 1  # close: nothing new to make durable, no second os.sync
    with Uploader(store) as up:
        up.flush()
        up.submit(hashlib.sha256(b"b").hexdigest(), b"b")
    assert store.barriers == 3  # a chunk after the flush: close makes it durable
    assert store.get(blob_key(hashlib.sha256(b"b").hexdigest()))[0] == b"b"
