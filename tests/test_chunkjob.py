"""The model file chunked in a child process (issue 13, ``ota.repository._chunkjob``).

The child runs the same chunker as the in-process path; the parent must get exactly that
entry, refuse anything malformed from the child, and never leave a child or a temp copy behind
(a stopped or failed job, a job nobody adopted).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ota.bundle import blob_key
from ota.repository import PublishRequest, publish
from ota.repository._chunker import MAX_CHUNK, Uploader, chunk_file
from ota.repository._chunkjob import ChunkJob, ChunkJobError, _entry, prestart, take
from ota.repository._fileblob import blob_copy_path, local_copy_folder, new_copy_path
from ota.repository._publish import _chunk_model_early, _Stopped
from ota.repository._storage import FileStorage
from tests.onnx_models import big_mlp, save
from tests.repo_helpers import fake_chunk_child, make_project


def _random_file(path: Path, size: int, seed: int = 0) -> Path:
    import numpy as np

    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def test_the_child_reports_what_the_in_process_chunker_computes(tmp_path: Path) -> None:
    source = _random_file(tmp_path / "model.bin", 9 * 1024 * 1024 + 12345)
    expected = chunk_file(source, "x", None)
    copy = new_copy_path(tmp_path / "blobs")
    seen: list[int] = []
    entry = ChunkJob.start(source, copy).result(seen.append)
    assert (entry.sha256, entry.size, entry.chunks) == (
        expected.sha256,
        expected.size,
        expected.chunks,
    )
    assert len(entry.chunks) >= 2
    assert copy.read_bytes() == source.read_bytes()  # the copy is the file blob to be
    assert sum(seen) == entry.size  # progress adds up to the file


def test_a_publish_through_the_child_stores_the_file_blob_and_the_same_entry(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path)
    model = save(big_mlp(12), tmp_path / "big.onnx")
    assert model.stat().st_size > MAX_CHUNK  # the child path, not the in-process one
    expected = chunk_file(model, "model/model.onnx", None)
    publish(project, PublishRequest(source=model, name="m", version="1.0.0"))
    blob = tmp_path / "repo" / blob_key(expected.sha256)
    assert blob.read_bytes() == model.read_bytes()
    from ota.repository._index import load_manifest, read_index
    from ota.repository._txn import Transaction

    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    assert read_index(txn, "m") is not None
    entry = load_manifest(project.storage, txn, "m", "1.0.0").file("model/model.onnx")
    assert entry == expected
    assert not list((tmp_path / "repo").rglob(".file.*"))  # no temp copy left


@pytest.mark.parametrize(
    ("report", "why"),
    [
        (b"not json", "malformed"),
        (b'{"sha256": "ab", "size": 10, "chunks": [["' + b"a" * 64 + b'", 10]]}', "describe"),
        (b'{"sha256": "' + b"a" * 64 + b'", "size": 11, "chunks": [["' + b"a" * 64 + b'", 10]]}',
         "describe"),
        (b'{"sha256": "' + b"a" * 64 + b'", "size": 10, "chunks": [["' + b"a" * 64 + b'", 9]]}',
         "add up"),
        (b'{"sha256": "' + b"a" * 64 + b'", "size": 10, "chunks": [["' + b"A" * 64 + b'", 10]]}',
         "malformed chunk"),
        (b'{"sha256": "' + b"a" * 64 + b'", "size": 10, "chunks": []}', "add up"),
        (b'{"sha256": "' + b"a" * 64 + b'", "size": 10, "chunks": [["' + b"a" * 64
         + b'", 11], ["' + b"a" * 64 + b'", -1]]}', "malformed chunk"),
        (b'{"sha256": "' + b"a" * 64 + b'", "size": 10}', "malformed"),
    ],
)  # fmt: skip
def test_a_malformed_report_is_refused(report: bytes, why: str) -> None:
    with pytest.raises(ChunkJobError, match=why):
        _entry(report, 10, Path("model.onnx"))


def test_an_oversized_chunk_in_a_report_is_refused() -> None:
    size = MAX_CHUNK + 1
    doc = (
        b'{"sha256": "'
        + b"a" * 64
        + b'", "size": %d, "chunks": [["' % size
        + b"b" * 64
        + b'", %d]]}' % size
    )
    with pytest.raises(ChunkJobError, match="malformed chunk"):
        _entry(doc, size, Path("model.onnx"))


def test_a_report_over_its_bound_is_refused_and_the_copy_removed(tmp_path: Path) -> None:
    job = fake_chunk_child(tmp_path, "import sys; sys.stdout.write('=' + ' ' * 10_000_000)")
    with pytest.raises(ChunkJobError, match="report over"):
        job.result()
    assert not job.copy.exists()


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("import sys; sys.stderr.write('disk on fire'); sys.exit(1)", "disk on fire"),
        ("print('+12'); print('hello')", "unexpected output"),
        ("print('+99999')", "bad progress"),
        ("print('+abc')", "bad progress"),
        ("import os; os.kill(os.getpid(), 9)", "status -9"),
        ("import sys; print('={}'); sys.exit(3)", "status 3"),
    ],
)
def test_a_failed_or_lying_child_fails_the_job(tmp_path: Path, code: str, why: str) -> None:
    job = fake_chunk_child(tmp_path, code)
    with pytest.raises(ChunkJobError, match=why):
        job.result()
    assert not job.copy.exists()


def test_a_source_that_vanishes_fails_the_job_cleanly(tmp_path: Path) -> None:
    source = _random_file(tmp_path / "model.bin", MAX_CHUNK + 1)
    copy = new_copy_path(tmp_path / "blobs")
    job = ChunkJob(source, copy, source.stat().st_size, subprocess.Popen(
        [sys.executable, "-P", "-m", "ota.repository._chunkjob", str(tmp_path / "gone"),
         str(copy)], stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    with pytest.raises(ChunkJobError, match="failed"):
        job.result()
    assert not copy.exists()


def test_cancel_kills_the_child_and_removes_the_copy(tmp_path: Path) -> None:
    job = fake_chunk_child(tmp_path, "import time; time.sleep(600)")
    job.cancel()
    assert job._proc.poll() is not None  # reaped: no child left running
    assert not job.copy.exists()
    job.cancel()  # idempotent


def test_a_progress_callback_that_raises_cancels_the_job(tmp_path: Path) -> None:
    source = _random_file(tmp_path / "model.bin", 40 * 1024 * 1024)
    job = ChunkJob.start(source, new_copy_path(tmp_path / "blobs"))

    def stop(_n: int) -> None:
        raise _Stopped("checks failed")

    with pytest.raises(_Stopped):
        job.result(stop)
    assert job._proc.poll() is not None
    assert not job.copy.exists()


def test_a_stopped_early_chunking_in_a_child_leaves_nothing(tmp_path: Path) -> None:
    """As ``test_publish_overlap``'s stop test, through the child path (the defaults)."""
    source = _random_file(tmp_path / "model.onnx", 20 * 1024 * 1024)
    store = FileStorage(tmp_path / "repo")
    stop = threading.Event()
    stop.set()
    req = PublishRequest(source=source, name="m", version="1.0.0")
    copies: dict[str, Path | None] = {}
    folder = local_copy_folder(tmp_path / "repo")
    with ThreadPoolExecutor(max_workers=1) as side, Uploader(store) as up:
        job = _chunk_model_early(
            side, req, up, None, stop, lambda s: blob_copy_path(store, s, tmp_path), copies,
            False, child_folder=folder,
        )  # fmt: skip
        assert job is not None
        with pytest.raises(_Stopped):
            job.result()
    copy = copies["model/model.onnx"]
    assert copy is not None and copy.parent == folder
    assert not copy.exists()


def test_prestart_hands_over_only_the_job_asked_for(tmp_path: Path) -> None:
    source = _random_file(tmp_path / "model.bin", MAX_CHUNK + 4096)
    folder = tmp_path / "repo" / "blobs" / "sha256"
    prestart(source, folder)
    assert take(source, tmp_path / "elsewhere") is None  # another folder: cancelled
    assert not list(folder.glob(".file.*"))  # ... and its copy removed
    prestart(source, folder)
    job = take(source, folder)
    assert job is not None
    assert take(source, folder) is None  # handed over once
    assert job.result().sha256 == chunk_file(source, "x", None).sha256
    job.copy.unlink()


def test_prestart_of_a_file_that_then_changes_size_is_not_used(tmp_path: Path) -> None:
    source = _random_file(tmp_path / "model.bin", MAX_CHUNK + 4096)
    folder = tmp_path / "blobs"
    prestart(source, folder)
    with source.open("ab") as f:
        f.write(b"more")
    assert take(source, folder) is None
    assert not list(folder.glob(".file.*"))


def test_prestart_ignores_small_and_missing_files(tmp_path: Path) -> None:
    small = _random_file(tmp_path / "small.bin", MAX_CHUNK)  # one chunk at most: in-process
    prestart(small, tmp_path / "blobs")
    prestart(tmp_path / "missing.bin", tmp_path / "blobs")
    assert take(small, tmp_path / "blobs") is None
    assert not list((tmp_path / "blobs").glob(".file.*"))


_UNADOPTED = """
import sys
from pathlib import Path
from ota.repository._chunkjob import prestart, _early
prestart(Path(sys.argv[1]), Path(sys.argv[2]))
job = next(iter(_early.values()))
print(job._proc.pid, flush=True)
"""


def test_an_unadopted_job_is_killed_and_its_copy_removed_at_exit(tmp_path: Path) -> None:
    """A CLI that started a job and then failed before its publish adopted it (a bad
    project, say) leaves no child and no temp copy."""
    source = _random_file(tmp_path / "model.bin", 64 * 1024 * 1024)
    folder = tmp_path / "blobs"
    proc = subprocess.run(
        [sys.executable, "-c", _UNADOPTED, str(source), str(folder)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    pid = int(proc.stdout.split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped by its parent at exit, not an orphan still running
    assert not list(folder.glob(".file.*"))
