"""Binary deltas (issue 13, ADR 0012): the publisher computes and signs them, the device uses
one only when it is cheaper than the missing chunks, verified before and after applying, and
falls back to the chunks on any failure.

A 2 MB model (``big_mlp``) is published as ``det 1.0.0``, then with 10 % of its floats changed
at scattered positions as ``det 1.1.0`` (every chunk changes: the chunk path fetches the whole
file). Devices and the repository are real (HTTP, TUF, the stager).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ota.bundle import Budget, FileEntry, FormatError, Manifest, SmokeSpec, blob_key
from ota.client._fetch import BlobFetcher, make_pool
from ota.client._patch import (
    CODEC,
    DELTAS_KEY,
    SUB_XZ,
    DeltaEntry,
    DeltaRefused,
    Local,
    PatchReport,
    apply_one,
    choose_deltas,
    deltas_from_target,
    memory_budget,
)
from ota.errors import LocalError, SecurityError
from ota.repository import PublishRequest, gc, publish
from ota.repository import _deltas as pub_deltas
from ota.repository._deltas import XZ_DEFAULT, DeltaSettings, DeltaStats, patch_from, sub_xz
from ota.repository._index import release_target
from ota.repository._txn import Transaction
from tests import http_faults
from tests.onnx_models import big_mlp, save
from tests.repo_helpers import make_project
from tests.updater_world import FAST, Base, World, current_version

MODEL = "model/model.onnx"


def scattered(model: onnx.ModelProto, fraction: float = 0.1, seed: int = 3) -> onnx.ModelProto:
    """A copy with ``fraction`` of every tensor's floats nudged, at random positions."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        arr = numpy_helper.to_array(t).copy()
        flat = arr.reshape(-1)
        idx = rng.choice(flat.size, int(flat.size * fraction), replace=False)
        flat[idx] += rng.standard_normal(idx.size).astype(np.float32) * 0.01
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return out


def _publish(proj: Any, version: str, model: onnx.ModelProto, **kw: Any) -> Any:
    path = save(model, proj.root_dir.parent / "models" / version / "model.onnx")
    return publish(proj, PublishRequest(source=path, name="det", version=version, **kw))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("deltas")
    proj = make_project(root)
    v1 = big_mlp(2)
    _publish(proj, "1.0.0", v1)
    shutil.copytree(root / "repo", root / "repo_v1")
    res = _publish(proj, "1.1.0", scattered(v1))
    assert res.deltas is not None and res.deltas.computed == 1, res.deltas
    shutil.copytree(root / "repo", root / "repo_v2")
    return Base(root)


@pytest.fixture
def world(base: Base, tmp_path: Path) -> Iterator[World]:
    with http_faults.serve(tmp_path / "repo") as fs:
        yield World(tmp_path, base, fs)


def _target(w: World, version: str) -> Any:
    proj = w.project()
    txn = Transaction.begin(proj.storage, proj.signers, proj.expiry())
    return release_target(txn, "det", version)


def _delta(w: World, version: str = "1.1.0") -> DeltaEntry:
    (d,) = deltas_from_target(_target(w, version).custom)
    return d


def _model_size(w: World) -> int:
    return int(next(f for f in _manifest(w).files if f.path == MODEL).size)


def _manifest(w: World, version: str = "1.1.0") -> Manifest:
    from ota.repository._index import load_manifest

    proj = w.project()
    txn = Transaction.begin(proj.storage, proj.signers, proj.expiry())
    return load_manifest(proj.storage, txn, "det", version)


def _update_from_v1(w: World, **kw: Any) -> Any:
    """Commit 1.0.0 on a fresh device, then update to the newest release of the test's repo."""
    w.committed_at("v1")
    w.use("v2")
    if kw.get("prepare"):
        kw.pop("prepare")(w)
    res = w.update(**kw)
    assert res.status == "updated", res.to_dict()
    assert current_version(w.device) == "1.1.0"  # every file re-checked against its manifest
    return res


# -- the publisher ---------------------------------------------------------------------------


def test_publisher_signs_a_delta_from_the_previous_release(world: World) -> None:
    world.use("v2")
    d = _delta(world)
    old = next(f for f in _manifest(world, "1.0.0").files if f.path == MODEL)
    new = next(f for f in _manifest(world).files if f.path == MODEL)
    assert (d.path, d.base_version, d.base_sha256, d.base_size) == (
        MODEL,
        "1.0.0",
        old.sha256,
        old.size,
    )
    assert (d.result_sha256, d.result_size) == (new.sha256, new.size)
    blob = (world.repo / blob_key(d.sha256)).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == d.sha256 and len(blob) == d.size
    assert d.size < 0.3 * new.size  # scattered changes: far below the whole file
    assert not deltas_from_target(_target(world, "1.0.0").custom)  # a first release has none


def test_gc_keeps_delta_blobs(world: World) -> None:
    world.use("v2")
    d = _delta(world)
    gc(world.project(), grace_seconds=0)
    assert (world.repo / blob_key(d.sha256)).exists()


def test_delta_releases_zero_publishes_none(world: World) -> None:
    world.use("v1")
    res = _publish(
        world.project(), "1.2.0", scattered(big_mlp(2), seed=5), deltas=DeltaSettings(releases=0)
    )
    assert res.deltas.computed == 0
    assert not deltas_from_target(_target(world, "1.2.0").custom)


def test_max_file_bytes_bounds_the_publisher(world: World) -> None:
    world.use("v1")
    res = _publish(
        world.project(),
        "1.2.0",
        scattered(big_mlp(2), seed=5),
        deltas=DeltaSettings(max_file_bytes=1024),
    )
    assert res.deltas.computed == 0 and "over 1024" in res.deltas.skipped[0]
    assert not deltas_from_target(_target(world, "1.2.0").custom)


# -- the device ------------------------------------------------------------------------------


def test_device_applies_the_delta_instead_of_every_chunk(world: World) -> None:
    res = _update_from_v1(world)
    fig = res.outcomes[0].figures
    (applied,) = fig["delta"]["applied"]
    assert applied["base_version"] == "1.0.0"
    assert applied["chunk_bytes_avoided"] == _model_size(world)  # every chunk had changed
    # the model came from the delta: the chunks fetched are the small files of the bundle
    assert fig["stage"]["bytes_downloaded"] < 0.05 * _model_size(world)
    assert res.bytes < 0.5 * _model_size(world)  # metadata + delta, not the model
    assert not (world.device / "models" / "det" / "delta.tmp").exists()


def test_device_without_the_base_fetches_chunks(world: World) -> None:
    world.use("v2")
    world.init()
    res = world.update()
    assert res.status == "updated", res.to_dict()
    fig = res.outcomes[0].figures
    assert not fig["delta"]["applied"]
    assert fig["stage"]["bytes_downloaded"] >= _model_size(world)


def test_release_without_deltas_installs_by_chunks(world: World) -> None:
    world.committed_at("v1")
    _publish(world.project(), "1.1.0", scattered(big_mlp(2)), deltas=DeltaSettings(releases=0))
    res = world.update()
    assert res.status == "updated", res.to_dict()
    assert current_version(world.device) == "1.1.0"
    assert res.outcomes[0].figures["delta"] == PatchReport().to_dict()


def test_tampered_delta_blob_is_refused_and_chunks_used(world: World) -> None:
    def tamper(w: World) -> None:
        blob = w.repo / blob_key(_delta(w).sha256)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.chmod(0o644)
        blob.write_bytes(bytes(data))

    res = _update_from_v1(world, prepare=tamper)
    fig = res.outcomes[0].figures
    assert not fig["delta"]["applied"]
    assert "failed verification" in fig["delta"]["refused"][0]["reason"]
    assert fig["stage"]["bytes_downloaded"] >= _model_size(world)  # the chunks, verified
    assert any(
        "delta from 1.0.0 refused" in e["data"]["reason"] for e in world.events("security")
    ), world.events("security")


def test_base_mismatch_is_refused_before_applying(world: World) -> None:
    def corrupt_installed_model(w: World) -> None:
        for model in (w.device / "models" / "det").glob("*/model/model.onnx"):
            data = bytearray(model.read_bytes())
            data[-100] ^= 0x01
            model.chmod(0o644)
            model.write_bytes(bytes(data))

    res = _update_from_v1(world, prepare=corrupt_installed_model)
    fig = res.outcomes[0].figures
    assert not fig["delta"]["applied"]
    assert "base" in fig["delta"]["refused"][0]["reason"]


def test_delta_whose_output_differs_is_refused(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher (or bins key holder) that signs a delta decoding to other bytes of the same
    size: the device decodes it, finds another hash, and installs the chunks."""
    world.use("v1")

    def wrong(
        base: bytes, new: bytes, new_sha256: str, settings: DeltaSettings, stats: Any = None
    ) -> tuple[str, bytes]:
        other = bytearray(new)
        other[len(other) // 3] ^= 0x01
        return SUB_XZ, sub_xz(base, bytes(other), XZ_DEFAULT)

    monkeypatch.setattr(pub_deltas, "best_delta", wrong)
    _publish(world.project(), "1.1.0", scattered(big_mlp(2)))
    shutil.rmtree(world.base.root / "repo_v2x", ignore_errors=True)
    shutil.copytree(world.repo, world.base.root / "repo_v2x")
    world.committed_at("v1")
    world.use("v2x")
    res = world.update()
    assert res.status == "updated", res.to_dict()
    assert current_version(world.device) == "1.1.0"
    fig = res.outcomes[0].figures
    assert not fig["delta"]["applied"]
    assert "another file" in fig["delta"]["refused"][0]["reason"]
    shutil.rmtree(world.base.root / "repo_v2x")


# -- the choice and the apply, attacked directly ---------------------------------------------


def _entry(f: FileEntry, **kw: Any) -> DeltaEntry:
    doc: dict[str, Any] = {
        "path": f.path,
        "base_version": "1.0.0",
        "base_sha256": "a" * 64,
        "base_size": f.size,
        "sha256": "b" * 64,
        "size": f.size // 10,
        "result_sha256": f.sha256,
        "result_size": f.size,
    }
    doc.update(kw)
    return DeltaEntry(**doc)


def _local(tmp: Path, f: FileEntry, sha: str = "a" * 64) -> Local:
    return Local(tmp, Manifest("det", "1.0.0", (FileEntry(f.path, sha, f.size, ()),)))


def test_choice_refuses_oversize_foreign_and_over_budget(world: World, tmp_path: Path) -> None:
    world.use("v2")
    m = _manifest(world)
    f = m.file(MODEL)
    cases = {
        "oversize": _entry(f, size=f.size),
        "not the manifest's file": _entry(f, result_sha256="c" * 64),
        "over the budget": _entry(f),
    }
    for why, e in cases.items():
        report = PatchReport()
        budget = 1024 if why == "over the budget" else 2**40
        assert choose_deltas(m, [e], [_local(tmp_path, f)], budget, report) == [], why
        assert why.split()[-1] in report.skipped[0]["reason"] or why in str(report.skipped)
    report = PatchReport()
    (chosen,) = choose_deltas(m, [_entry(f)], [_local(tmp_path, f)], 2**40, report)
    assert chosen[0] == _entry(f) and chosen[2] == f.size
    # chunks cheaper than the delta: chunks win
    report = PatchReport()
    same = Local(tmp_path, m)  # every chunk already on the device
    assert choose_deltas(m, [_entry(f)], [same, _local(tmp_path, f)], 2**40, report) == []


def test_apply_refuses_a_blob_longer_than_announced(world: World, tmp_path: Path) -> None:
    world.use("v2")
    d = _delta(world)
    base = next(p for p in world.base.root.glob("proj/../models/1.0.0/model.onnx"))
    short = DeltaEntry(**{**d.to_dict(), "size": d.size - 10})
    fetcher = BlobFetcher(make_pool(FAST), world.fs.url, FAST)
    with pytest.raises(SecurityError, match="more than"):
        apply_one(short, base, tmp_path / "out", fetcher)
    wrong_base = tmp_path / "base"
    data = bytearray(base.read_bytes())
    data[0] ^= 1
    wrong_base.write_bytes(bytes(data))
    with pytest.raises(DeltaRefused, match="base"):
        apply_one(d, wrong_base, tmp_path / "out", fetcher)
    apply_one(d, base, tmp_path / "out", fetcher)
    assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == d.result_sha256


def test_malformed_delta_lists_are_refused() -> None:
    good = _entry(FileEntry(MODEL, "d" * 64, 100, ())).to_dict()
    for bad in (
        {**good, "extra": 1},
        {**good, "size": -1},
        {**good, "path": "../x"},
        {**good, "codec": "Bad Codec!"},
        {**good, "codec": 7},
        {**good, "sha256": "A" * 64},
    ):
        with pytest.raises(FormatError):
            deltas_from_target({DELTAS_KEY: [bad]})
    with pytest.raises(FormatError):
        deltas_from_target({DELTAS_KEY: [good] * 65})
    assert deltas_from_target({"edge-ota": {}}) == ()


def test_memory_budget_follows_the_tier() -> None:
    from ota.bundle import Release

    spec = SmokeSpec(
        inputs="smoke/inputs.npz",
        golden="smoke/golden.npz",
        budgets={"small": Budget(peak_mem_mb=100.0)},
    )
    rel = Release(name="det", version="1.0.0", counter=1, smoke=spec)
    assert memory_budget(rel, "small") == 100 * 1024 * 1024
    assert memory_budget(rel, "other") > 100 * 1024 * 1024  # half of physical memory


def test_small_files_get_no_delta(world: World) -> None:
    """Under one average chunk a delta saves too little to be worth a request and a decode."""
    world.use("v1")
    res = _publish(
        world.project(),
        "1.2.0",
        scattered(big_mlp(2), seed=5),
        deltas=DeltaSettings(min_file_bytes=64 * 1024 * 1024),
    )
    assert res.deltas.computed == 0
    assert not deltas_from_target(_target(world, "1.2.0").custom)


def test_cli_bounds_the_deltas(tmp_path: Path) -> None:
    """``ota publish --delta-releases N --delta-max-mb M`` reaches the publisher."""
    from click.testing import CliRunner

    from ota.cli._main import _register, cli

    _register()  # the lazily registered commands, as ``ota`` does
    proj = make_project(tmp_path)
    _publish(proj, "1.0.0", big_mlp(2))
    model = save(scattered(big_mlp(2), seed=6), tmp_path / "cli" / "model.onnx")
    args = ["publish", str(model), "--project", str(proj.root_dir), "--name", "det", "--json"]

    def deltas(version: str) -> tuple[DeltaEntry, ...]:
        txn = Transaction.begin(proj.storage, proj.signers, proj.expiry())
        return deltas_from_target(release_target(txn, "det", version).custom)

    res = CliRunner().invoke(cli, [*args, "--version", "1.2.0", "--delta-max-mb", "0.5"])
    assert res.exit_code == 0, res.output
    assert not deltas("1.2.0")
    save(scattered(big_mlp(2), seed=7), model)  # another file: 1.2.0's would need no delta
    res = CliRunner().invoke(cli, [*args, "--version", "1.3.0", "--delta-releases", "1"])
    assert res.exit_code == 0, res.output
    (d,) = deltas("1.3.0")
    assert d.base_version == "1.2.0"  # only the most recent release
    res = CliRunner().invoke(cli, [*args, "--version", "1.4.0", "--delta-releases", "17"])
    assert res.exit_code == 2  # out of range: a usage error


def test_mirror_sync_copies_delta_blobs(world: World, tmp_path: Path) -> None:
    """A site mirror serves the deltas too (else its devices would fall back to chunks)."""
    from ota.repository._mirror import open_source, sync
    from ota.repository._storage import FileStorage

    world.use("v2")
    mirror = tmp_path / "mirror"
    sync(open_source(world.fs.url), FileStorage(mirror), world.base.trusted_root)
    d = _delta(world)
    data = (mirror / blob_key(d.sha256)).read_bytes()
    assert hashlib.sha256(data).hexdigest() == d.sha256


# -- codecs (sub-xz beside zstd-patch-from) ---------------------------------------------------


def test_publisher_keeps_the_smallest_codec(world: World) -> None:
    """Same length (scattered floats): both codecs are tried and the smaller is signed."""
    world.use("v2")
    stats = DeltaStats()
    base = world.base.root / "models" / "1.0.0" / "model.onnx"
    new = (world.base.root / "models" / "1.1.0" / "model.onnx").read_bytes()
    codec, frame = pub_deltas.best_delta(
        base.read_bytes(), new, hashlib.sha256(new).hexdigest(), DeltaSettings(), stats
    )
    tried = {c["codec"]: c["bytes"] for c in stats.candidates}
    assert set(tried) == {SUB_XZ, CODEC}
    assert (codec, len(frame)) == min(tried.items(), key=lambda kv: kv[1])
    assert codec == SUB_XZ  # scattered changes: the transform wins
    assert _delta(world).codec == SUB_XZ  # what the fixture's publish signed
    # another length (fp16 re-export, a grown file): only zstd-patch-from
    stats = DeltaStats()
    longer = new + b"\0" * 100
    codec, _ = pub_deltas.best_delta(
        base.read_bytes(), longer, hashlib.sha256(longer).hexdigest(), DeltaSettings(), stats
    )
    assert codec == CODEC and {c["codec"] for c in stats.candidates} == {CODEC}


def test_device_applies_a_zstd_delta_when_the_transform_is_off(world: World) -> None:
    world.committed_at("v1")
    _publish(world.project(), "1.1.0", scattered(big_mlp(2)), deltas=DeltaSettings(transform=False))
    assert _delta(world).codec == CODEC
    res = world.update()
    assert res.status == "updated", res.to_dict()
    assert current_version(world.device) == "1.1.0"
    (applied,) = res.outcomes[0].figures["delta"]["applied"]
    assert applied["codec"] == CODEC


def _serve_blob(w: World, frame: bytes) -> tuple[str, int]:
    """Put ``frame`` in the served repository as a blob; its (sha256, size)."""
    digest = hashlib.sha256(frame).hexdigest()
    path = w.repo / blob_key(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(frame)
    return digest, len(frame)


def _crafted(w: World, tmp: Path, codec: str, result: bytes, **kw: Any) -> DeltaEntry:
    """A delta entry for ``result`` from 1.0.0's model, of ``codec``, its blob served."""
    base = (w.base.root / "models" / "1.0.0" / "model.onnx").read_bytes()
    frame = sub_xz(base, result, XZ_DEFAULT) if codec == SUB_XZ else patch_from(base, result, 3)
    digest, size = _serve_blob(w, kw.pop("frame", frame))
    doc: dict[str, Any] = {
        "path": MODEL,
        "base_version": "1.0.0",
        "base_sha256": hashlib.sha256(base).hexdigest(),
        "base_size": len(base),
        "sha256": digest,
        "size": size,
        "result_sha256": hashlib.sha256(result).hexdigest(),
        "result_size": len(result),
        "codec": codec,
    }
    doc.update(kw)
    return DeltaEntry(**doc)


@pytest.mark.parametrize("codec", [SUB_XZ, CODEC])
def test_each_codec_refuses_wrong_output_oversize_and_truncation(
    world: World, tmp_path: Path, codec: str
) -> None:
    world.use("v2")
    base = world.base.root / "models" / "1.0.0" / "model.onnx"
    new = bytearray(base.read_bytes())
    new[1000:1100] = bytes(range(100))
    new_b = bytes(new)
    fetcher = BlobFetcher(make_pool(FAST), world.fs.url, FAST)
    out = tmp_path / "out"
    good = _crafted(world, tmp_path, codec, new_b)
    apply_one(good, base, out, fetcher)
    assert out.read_bytes() == new_b
    out.unlink()
    # signed result hash of other bytes: decoded, hashed, refused, nothing left behind
    other = _crafted(world, tmp_path, codec, new_b, result_sha256="0" * 64)
    with pytest.raises(DeltaRefused, match="another file"):
        apply_one(other, base, out, fetcher)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # decodes to more than the signed result size: stopped at the bound
    frame = sub_xz(base.read_bytes(), new_b + b"x" * 3_000_000, XZ_DEFAULT)
    if codec == CODEC:
        frame = patch_from(base.read_bytes(), new_b + b"x" * 3_000_000, 3)
    big = _crafted(world, tmp_path, codec, new_b, frame=frame)
    with pytest.raises(DeltaRefused, match=r"more than|announces"):
        apply_one(big, base, out, fetcher)
    # a truncated blob (signed as such): refused, not a crash
    full = sub_xz(base.read_bytes(), new_b, XZ_DEFAULT) if codec == SUB_XZ else None
    full = full if full is not None else patch_from(base.read_bytes(), new_b, 3)
    cut = _crafted(world, tmp_path, codec, new_b, frame=full[: len(full) // 2])
    with pytest.raises(DeltaRefused):
        apply_one(cut, base, out, fetcher)
    # data after the stream
    tail = _crafted(world, tmp_path, codec, new_b, frame=full + b"\0junk")
    with pytest.raises(DeltaRefused, match="after"):
        apply_one(tail, base, out, fetcher)
    assert not out.exists()


def test_codec_mismatch_is_refused(world: World, tmp_path: Path) -> None:
    """A blob signed under the other codec's name never reaches the other decoder's output."""
    world.use("v2")
    base = world.base.root / "models" / "1.0.0" / "model.onnx"
    new = base.read_bytes()[:-1] + b"\x01"
    fetcher = BlobFetcher(make_pool(FAST), world.fs.url, FAST)
    xz_as_zstd = DeltaEntry(**{**_crafted(world, tmp_path, SUB_XZ, new).to_dict(), "codec": CODEC})
    with pytest.raises(DeltaRefused, match="not a zstd frame"):
        apply_one(xz_as_zstd, base, tmp_path / "out", fetcher)
    zstd_as_xz = DeltaEntry(**{**_crafted(world, tmp_path, CODEC, new).to_dict(), "codec": SUB_XZ})
    with pytest.raises(DeltaRefused, match="not an xz stream"):
        apply_one(zstd_as_xz, base, tmp_path / "out", fetcher)
    assert not (tmp_path / "out").exists()


def test_sub_xz_base_mismatch_is_refused_before_fetching(world: World, tmp_path: Path) -> None:
    world.use("v2")
    d = _delta(world)
    assert d.codec == SUB_XZ
    base = world.base.root / "models" / "1.0.0" / "model.onnx"
    wrong = tmp_path / "base"
    data = bytearray(base.read_bytes())
    data[-1] ^= 1
    wrong.write_bytes(bytes(data))
    (world.repo / blob_key(d.sha256)).unlink()  # a fetch would fail differently
    fetcher = BlobFetcher(make_pool(FAST), world.fs.url, FAST)
    with pytest.raises(DeltaRefused, match="base"):
        apply_one(d, wrong, tmp_path / "out", fetcher)
    longer = tmp_path / "longer"
    longer.write_bytes(base.read_bytes() + b"\0")
    with pytest.raises(DeltaRefused, match="base"):
        apply_one(d, longer, tmp_path / "out", fetcher)


def test_unknown_codec_is_skipped_for_the_chunks(world: World, tmp_path: Path) -> None:
    """A codec this device does not know is parsed, skipped, and the chunks are used: a
    publisher may add codecs without breaking older devices."""
    world.use("v2")
    m = _manifest(world)
    f = m.file(MODEL)
    (e,) = deltas_from_target({DELTAS_KEY: [{**_entry(f).to_dict(), "codec": "bsdiff"}]})
    report = PatchReport()
    assert choose_deltas(m, [e], [_local(tmp_path, f)], 2**40, report) == []
    assert "unknown codec" in report.skipped[0]["reason"]
    fetcher = BlobFetcher(make_pool(FAST), world.fs.url, FAST)
    with pytest.raises(LocalError, match="unknown delta codec"):
        apply_one(e, tmp_path / "none", tmp_path / "out", fetcher)


def test_sub_xz_memory_is_flat_in_the_file_size() -> None:
    f = FileEntry(MODEL, "d" * 64, 2**30, ())
    small = _entry(f, codec=SUB_XZ, size=10 * 2**20)
    assert small.memory_needed() < 200 * 2**20  # a 1 GiB file: blob + decoder + blocks
    assert _entry(f, size=10 * 2**20).memory_needed() > 3 * 2**30  # zstd: base twice + result
