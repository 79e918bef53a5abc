"""ADR 0017: each multi-chunk file is stored once, as its file blob; chunk blobs only with
``chunk_blobs = true``. Attacked: a device facing a release whose file blob was removed,
tampered or cut short installs nothing and keeps its running model; ``ota gc`` keeps every
blob a live release needs under either layout; the server-side readers (offline media,
mirror, audit, deltas, rollback) read both layouts and the pre-ADR 0014 one (chunks only)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from ota.bundle import FileEntry, Manifest, blob_key
from ota.client import init_device, update_once
from ota.client._medium import update_from_medium
from ota.errors import ConfigError, SecurityError
from ota.repository import Project, PublishRequest, PublishResult, publish
from ota.repository._blobread import iter_chunks, read_file, storage_readers
from ota.repository._deltas import DeltaSettings
from ota.repository._index import load_manifest
from ota.repository._mirror import sync
from ota.repository._offline import export
from ota.repository._ops import gc
from ota.repository._storage import FileStorage, NotFound
from ota.repository._tufview import StorageSource
from ota.repository._txn import Transaction
from tests import http_faults
from tests.onnx_models import big_mlp, fine_tune, save
from tests.repo_helpers import make_project, serve_dir
from tests.updater_world import current_version

MODEL = "model/model.onnx"


def _project(tmp: Path, *, chunk_blobs: bool = False) -> Project:
    project = make_project(tmp)
    toml = tmp / "proj" / "ota.toml"
    assert "chunk_blobs = false" in toml.read_text()  # the default, written by `ota init`
    if chunk_blobs:
        toml.write_text(toml.read_text().replace("chunk_blobs = false", "chunk_blobs = true"))
        project = Project.open(tmp / "proj")
    assert project.config.chunk_blobs is chunk_blobs
    return project


def _publish(
    project: Project, tmp: Path, version: str, *, tune: float = 0.0, deltas: bool = True
) -> PublishResult:
    model = big_mlp(2, layers=4)
    if tune:
        model = fine_tune(model, tune)
    path = save(model, tmp / "models" / version / "model.onnx")
    req = PublishRequest(source=path, name="det", version=version, ring="ga")
    if not deltas:  # no binary delta (ADR 0012): the device must use the file blob
        req.deltas = DeltaSettings(releases=0)
    return publish(project, req)


def _manifest(project: Project, version: str) -> Manifest:
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    return load_manifest(project.storage, txn, "det", version)


def _blob(tmp: Path, sha256: str) -> Path:
    return tmp / "repo" / blob_key(sha256)


def _device(tmp: Path, base: str, name: str = "dev") -> Path:
    root = (tmp / "proj" / "root.json").read_bytes()
    init_device(tmp / name, base, root, name, ["det"], health_timeout_s=0)
    return tmp / name


def _installed(dev: Path) -> set[bytes]:
    return {hashlib.sha256(p.read_bytes()).digest() for p in dev.rglob("model.onnx")}


# -- what is stored -------------------------------------------------------------------------


def test_each_multichunk_file_is_stored_once_as_its_file_blob(tmp_path: Path) -> None:
    project = _project(tmp_path)
    result = _publish(project, tmp_path, "1.0.0")
    m = _manifest(project, "1.0.0")
    model = m.file(MODEL)
    assert len(model.chunks) > 1
    assert _blob(tmp_path, model.sha256).stat().st_size == model.size
    assert not any(_blob(tmp_path, c.sha256).exists() for c in model.chunks)
    for f in m.files:  # a one-chunk file's chunk blob is its file blob
        if len(f.chunks) == 1:
            assert _blob(tmp_path, f.sha256).read_bytes().__len__() == f.size
    stats = result.upload
    assert stats.file_blobs == 1 and stats.file_blob_bytes == model.size
    # each byte written once: the file blob, and the one-chunk files' chunk blobs
    assert model.size < stats.bytes_uploaded < model.size + 200_000
    assert stats.bytes_total >= model.size  # the chunk index still covers every byte
    assert not list((tmp_path / "repo" / "blobs" / "sha256").glob(".file.*"))  # no temp left


def test_chunk_blobs_option_also_stores_the_chunks(tmp_path: Path) -> None:
    project = _project(tmp_path, chunk_blobs=True)
    _publish(project, tmp_path, "1.0.0")
    model = _manifest(project, "1.0.0").file(MODEL)
    assert _blob(tmp_path, model.sha256).is_file()
    assert all(_blob(tmp_path, c.sha256).is_file() for c in model.chunks)


def test_without_file_blobs_a_republish_uploads_only_new_chunks_and_devices_install(
    tmp_path: Path,
) -> None:
    """``file_blobs = false`` (the pre-ADR 0014 layout, for a slow publisher uplink): chunk blobs
    only, so a 10 % fine-tune stores about 10 % of the model, and a device with nothing
    installs the whole release from chunk blobs, then the fine-tune by the chunks it lacks."""
    project = _project(tmp_path)
    toml = tmp_path / "proj" / "ota.toml"
    assert "file_blobs = true" in toml.read_text()  # the default, written by `ota init`
    toml.write_text(toml.read_text().replace("file_blobs = true", "file_blobs = false"))
    project = Project.open(tmp_path / "proj")
    assert project.config.file_blobs is False
    _publish(project, tmp_path, "1.0.0")
    first = _manifest(project, "1.0.0").file(MODEL)
    assert not _blob(tmp_path, first.sha256).exists()  # no whole-file blob
    assert all(_blob(tmp_path, c.sha256).is_file() for c in first.chunks)
    with serve_dir(tmp_path / "repo") as base:
        dev = _device(tmp_path, base)
        assert update_once(dev).status == "updated"
        result = _publish(project, tmp_path, "1.1.0", tune=0.1, deltas=False)
        new = _manifest(project, "1.1.0").file(MODEL)
        assert not _blob(tmp_path, new.sha256).exists()
        assert result.upload.file_blobs == 0 and result.upload.file_blob_bytes == 0
        # only the chunks the store lacked were written, less than the model (the default
        # layout writes the changed file whole)
        up = result.upload
        fresh = {c.sha256: c.size for c in new.chunks}.keys() - {c.sha256 for c in first.chunks}
        fresh_bytes = sum(c.size for c in new.chunks if c.sha256 in fresh)
        assert 0 < len(fresh) < len(new.chunks)
        assert fresh_bytes <= up.bytes_uploaded < new.size, up
        assert up.chunks_uploaded < up.chunks_total, up
        assert update_once(dev).status == "updated"
    assert current_version(dev) == "1.1.0"
    assert bytes.fromhex(new.sha256) in _installed(dev)


def test_a_non_boolean_layout_flag_is_a_config_error(tmp_path: Path) -> None:
    _project(tmp_path)
    toml = tmp_path / "proj" / "ota.toml"
    toml.write_text(toml.read_text().replace("file_blobs = true", 'file_blobs = "no"'))
    with pytest.raises(ConfigError, match="file_blobs must be true or false"):
        Project.open(tmp_path / "proj")


# -- devices, attacked ------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["removed", "tampered", "short", "chunk-swapped"])
def test_device_refuses_a_release_whose_file_blob_is_damaged(tmp_path: Path, attack: str) -> None:
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    # a plain static server with ranges (the device hangs up on a lying answer mid-body)
    with http_faults.serve(tmp_path / "repo") as server:
        dev = _device(tmp_path, server.url)
        assert update_once(dev).status == "updated"
        before = _installed(dev)
        _publish(project, tmp_path, "1.1.0", tune=0.3, deltas=False)
        new = _manifest(project, "1.1.0").file(MODEL)
        blob = _blob(tmp_path, new.sha256)
        data = blob.read_bytes()
        if attack == "removed":
            blob.unlink()
        elif attack == "tampered":
            blob.write_bytes(data[:-64] + bytes(64))
        elif attack == "short":
            blob.write_bytes(data[: len(data) // 2])
        else:  # right size, the changed chunks' bytes replaced by the file's first bytes
            c0 = new.chunks[0].size
            blob.write_bytes(data[:c0] + data[: len(data) - c0])
        result = update_once(dev)
    assert result.status in ("security", "error"), result.to_dict()
    assert result.exit_code != 0
    assert current_version(dev) == "1.0.0"
    assert _installed(dev) == before  # the running model untouched, nothing of 1.1.0 kept
    assert not any(p.name.startswith(".") for p in dev.rglob("*model.onnx*"))


def test_release_with_chunk_blobs_installs_without_its_file_blob(tmp_path: Path) -> None:
    """``chunk_blobs = true`` and the file blob gone (a pre-ADR 0014 layout): chunk blobs."""
    project = _project(tmp_path, chunk_blobs=True)
    _publish(project, tmp_path, "1.0.0")
    _blob(tmp_path, _manifest(project, "1.0.0").file(MODEL).sha256).unlink()
    with serve_dir(tmp_path / "repo") as base:
        dev = _device(tmp_path, base)
        assert update_once(dev).status == "updated"
    assert current_version(dev) == "1.0.0"


# -- gc ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_blobs", [False, True])
def test_gc_keeps_every_blob_a_live_release_needs(tmp_path: Path, chunk_blobs: bool) -> None:
    project = _project(tmp_path, chunk_blobs=chunk_blobs)
    _publish(project, tmp_path, "1.0.0")
    _publish(project, tmp_path, "1.1.0", tune=0.3)
    stray = tmp_path / "repo" / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"unreferenced")
    old_tmp = tmp_path / "repo" / "blobs" / "sha256" / ".file.killed.new"
    old_tmp.write_bytes(b"a killed publisher's copy")
    young_tmp = tmp_path / "repo" / "blobs" / "sha256" / ".file.running.new"
    young_tmp.write_bytes(b"a running publisher's copy")
    hour_ago = time.time() - 7200
    os.utime(stray, (hour_ago, hour_ago))
    os.utime(old_tmp, (hour_ago, hour_ago))
    res = gc(project, grace_seconds=3600)
    assert res.deleted == 1 and not stray.exists()
    assert not old_tmp.exists() and young_tmp.exists()
    for version in ("1.0.0", "1.1.0"):
        for f in _manifest(project, version).files:
            read_file(f, *storage_readers(project.storage))  # every byte still readable
    with serve_dir(tmp_path / "repo") as base:
        dev = _device(tmp_path, base)
        assert update_once(dev).status == "updated"
    assert current_version(dev) == "1.1.0"


def test_an_existing_file_blob_a_publish_reuses_is_made_young_for_gc(tmp_path: Path) -> None:
    """A re-publish of the same bytes reuses the blob: gc's grace must then protect it."""
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    blob = _blob(tmp_path, _manifest(project, "1.0.0").file(MODEL).sha256)
    hour_ago = time.time() - 7200
    os.utime(blob, (hour_ago, hour_ago))
    _publish(project, tmp_path, "1.0.1")  # same model bytes
    assert time.time() - blob.stat().st_mtime < 3600


# -- server-side readers over every layout ------------------------------------------------------


def _layout(tmp: Path, layout: str) -> Project:
    """``new`` (file blob only), ``both`` (chunk_blobs), ``old`` (chunks only: pre-ADR 0014)."""
    project = _project(tmp, chunk_blobs=layout != "new")
    _publish(project, tmp, "1.0.0")
    if layout == "old":
        _blob(tmp, _manifest(project, "1.0.0").file(MODEL).sha256).unlink()
    return project


@pytest.mark.parametrize("layout", ["new", "both", "old"])
def test_readers_read_every_layout_and_verify_each_chunk(tmp_path: Path, layout: str) -> None:
    project = _layout(tmp_path, layout)
    model = _manifest(project, "1.0.0").file(MODEL)
    src = (tmp_path / "models" / "1.0.0" / "model.onnx").read_bytes()
    assert read_file(model, *storage_readers(project.storage)) == src
    # the audit and mirror readers (a Source) too
    source = StorageSource(project.storage)
    assert b"".join(d for _, d in iter_chunks(model, source.read, source.read_range)) == src
    # a corrupted store is refused whichever blob holds the bytes
    target = _blob(tmp_path, model.sha256 if layout != "old" else model.chunks[1].sha256)
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(SecurityError):
        read_file(model, *storage_readers(project.storage))


def test_a_chunk_in_no_blob_is_not_found(tmp_path: Path) -> None:
    project = _layout(tmp_path, "new")
    model = _manifest(project, "1.0.0").file(MODEL)
    _blob(tmp_path, model.sha256).unlink()
    with pytest.raises(NotFound):
        read_file(model, *storage_readers(project.storage))


@pytest.mark.parametrize("layout", ["new", "old"])
def test_mirror_and_offline_medium_of_every_layout_install(tmp_path: Path, layout: str) -> None:
    project = _layout(tmp_path, layout)
    root = (tmp_path / "repo" / "metadata" / "1.root.json").read_bytes()
    mirror = FileStorage(tmp_path / "mirror")
    sync(StorageSource(project.storage), mirror, root)
    model = _manifest(project, "1.0.0").file(MODEL)
    assert (tmp_path / "mirror" / blob_key(model.sha256)).exists() == (layout == "new")
    with serve_dir(tmp_path / "mirror") as base:
        dev = _device(tmp_path, base)
        assert update_once(dev).status == "updated"
    assert current_version(dev) == "1.0.0"

    export(project, ["det"], tmp_path / "medium")  # the medium holds chunk blobs: any device
    assert all((tmp_path / "medium" / blob_key(c.sha256)).is_file() for c in model.chunks)
    other = _device(tmp_path, "http://127.0.0.1:9", "dev-offline")
    res = update_from_medium(other, tmp_path / "medium")
    assert res.status == "updated", res.to_dict()


def test_mirror_refuses_a_source_missing_a_chunk_no_file_blob_covers(tmp_path: Path) -> None:
    project = _layout(tmp_path, "old")
    model = _manifest(project, "1.0.0").file(MODEL)
    _blob(tmp_path, model.chunks[-1].sha256).unlink()
    root = (tmp_path / "repo" / "metadata" / "1.root.json").read_bytes()
    with pytest.raises(SecurityError, match="lacks chunk"):
        sync(StorageSource(project.storage), FileStorage(tmp_path / "mirror"), root)


def test_rollback_and_deltas_read_a_release_stored_as_file_blobs(tmp_path: Path) -> None:
    from ota.repository._deltas import _rebuild
    from ota.repository._ops import rollback

    project = _layout(tmp_path, "new")
    _publish(project, tmp_path, "1.1.0", tune=0.3)
    model = _manifest(project, "1.0.0").file(MODEL)
    assert (
        bytes(_rebuild(project.storage, model))
        == (tmp_path / "models" / "1.0.0" / "model.onnx").read_bytes()
    )
    rollback(project, "det", "1.0.0", ring="ga", percent=100.0)
    shutil.rmtree(tmp_path / "dev", ignore_errors=True)
    with serve_dir(tmp_path / "repo") as base:
        dev = _device(tmp_path, base)
        assert update_once(dev).status == "updated"
    assert (current_version(dev) or "").startswith("1.0.0+rollback.")
    assert _installed(dev) == {hashlib.sha256(model_bytes(tmp_path)).digest()}


def model_bytes(tmp: Path) -> bytes:
    return (tmp / "models" / "1.0.0" / "model.onnx").read_bytes()


def test_file_entry_of_one_chunk_reads_its_chunk_blob(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "repo")
    data = b"x" * 1000
    sha = hashlib.sha256(data).hexdigest()
    storage.put_blob(blob_key(sha), data)
    from ota.bundle import Chunk

    f = FileEntry("sbom.cdx.json", sha, len(data), (Chunk(sha, len(data)),))
    assert read_file(f, *storage_readers(storage)) == data


def test_s3_store_holds_the_file_blob_alone_and_readers_use_ranges(
    tmp_path: Path, s3_url: str, s3_endpoint: str
) -> None:
    """On S3 (moto, its own process) the file blob is uploaded whole, no chunk blob of it;
    the offline export, audit and delta readers get the chunks as ranged GETs of it."""
    make_project(tmp_path, s3_url, s3_endpoint=s3_endpoint)
    project = Project.open(tmp_path / "proj")
    _publish(project, tmp_path, "1.0.0")
    model = _manifest(project, "1.0.0").file(MODEL)
    store = project.storage
    assert store.exists(blob_key(model.sha256))
    assert not any(store.exists(blob_key(c.sha256)) for c in model.chunks)
    src = (tmp_path / "models" / "1.0.0" / "model.onnx").read_bytes()
    assert read_file(model, *storage_readers(store)) == src
    export(project, ["det"], tmp_path / "medium")
    assert (
        b"".join((tmp_path / "medium" / blob_key(c.sha256)).read_bytes() for c in model.chunks)
        == src
    )
    dev = _device(tmp_path, "http://127.0.0.1:9")
    res = update_from_medium(dev, tmp_path / "medium")
    assert res.status == "updated", res.to_dict()
    assert current_version(dev) == "1.0.0"


def test_a_file_that_turns_out_one_chunk_is_stored_as_its_chunk_blob(tmp_path: Path) -> None:
    """Above MIN_CHUNK a file gets a file-blob copy, but it may still be one chunk: then its
    chunk blob (the same key) is written by the uploader and the copy is dropped."""
    import random

    from ota.repository._chunker import Uploader, chunk_file
    from ota.repository._fileblob import blob_copy_path, store_file_blob

    src = tmp_path / "x.bin"
    src.write_bytes(random.Random(0).randbytes(400 * 1024))
    storage = FileStorage(tmp_path / "repo")
    with Uploader(storage) as up:
        copy = blob_copy_path(storage, src, tmp_path)
        assert copy is not None
        entry = chunk_file(src, "model/x.bin", up, None, copy, chunk_blobs=False)
        assert len(entry.chunks) == 1 and entry.chunks[0].sha256 == entry.sha256
        assert store_file_blob(storage, src, entry, tmp_path, copy) is False
        up.flush()
    assert not copy.exists()
    assert (tmp_path / "repo" / blob_key(entry.sha256)).read_bytes() == src.read_bytes()
    assert up.stats.chunks_uploaded == 1 and up.stats.bytes_uploaded == entry.size
