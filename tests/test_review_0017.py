"""Security review of ADR 0017 (file blobs as the only stored copy of a multi-chunk file).

Attacked here, each a finding that failed before its fix:

* a file blob holding the file's bytes *and more* (appended garbage): every device refuses it
  (its ``Content-Range`` total is not the file's size), yet ``ota audit`` called the release
  sound and the rollback/delta readers used it, since they read only ranges inside the file;
  now every reader that read the file from its blob checks that the blob ends where the file
  does (one ranged read past the end: empty, a 416 over HTTP);
* a folder (or an unreadable file) at a file blob's key in a local repository escaped the
  readers as a raw ``IsADirectoryError`` (a traceback from ``ota audit``); now a
  ``LocalError``, which the audit reports as a failed files check;
* an HTTP source that announces a body and cuts it short (or resets) escaped as a raw urllib3
  ``ProtocolError``; now a ``TransientError`` (exit 6);
* a publish reusing a file blob that a concurrent ``ota gc`` deleted between the check and the
  touch committed a release naming a missing blob; now it stores its own copy;
* ``ota gc --grace nan`` (or a negative grace) deleted a publish in progress's young blobs;
  now an ``InputError``.

Confirmed without a change: a mirror refuses an overlong file blob (``TooLarge``, exit 4).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ota.bundle import blob_key
from ota.errors import ExitCode, InputError, LocalError, SecurityError, TransientError
from ota.repository import Project
from ota.repository._audit import AuditOptions, audit
from ota.repository._blobread import read_file, storage_readers
from ota.repository._fileblob import _store_copy
from ota.repository._mirror import sync
from ota.repository._ops import gc
from ota.repository._storage import FileStorage, TooLarge
from ota.repository._tufview import HttpSource, Source, StorageSource
from ota.repository._verify import Report
from tests import http_faults
from tests.repo_helpers import serve_dir
from tests.test_publish_layout import (
    MODEL,
    _blob,
    _device,
    _installed,
    _manifest,
    _project,
    _publish,
)
from tests.updater_world import current_version


def _audit(project: Project, source: Source) -> Report:
    root = (project.root_dir / "root.json").read_bytes()
    return audit(source, root, "det", "1.0.0", AuditOptions())


def _files(report: Report) -> str:
    check = next(c for c in report.checks if c.name == "files")
    return f"{check.status}: {check.detail} {check.data.get('problems', '')}"


def test_an_overlong_file_blob_is_refused_by_devices_and_by_every_reader(tmp_path: Path) -> None:
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    entry = _manifest(project, "1.0.0").file(MODEL)
    assert len(entry.chunks) > 1
    # a clean release passes every reader, over a folder and over HTTP (a 416 past the end)
    assert _audit(project, StorageSource(project.storage)).ok
    with serve_dir(tmp_path / "repo") as base:
        assert _audit(project, HttpSource(base)).ok, _files(_audit(project, HttpSource(base)))
    assert len(read_file(entry, *storage_readers(project.storage))) == entry.size

    blob = _blob(tmp_path, entry.sha256)
    blob.write_bytes(blob.read_bytes() + b"\0" * 4096)  # the file's bytes, then more

    # the premise: a device refuses it and installs nothing
    with http_faults.serve(tmp_path / "repo") as server:
        dev = _device(tmp_path, server.url)
        result = update_once_safe(dev)
    assert result[0] in ("security", "error"), result
    assert result[1] != 0
    assert current_version(dev) is None
    assert _installed(dev) == set()

    # so no reader may call it sound
    report = _audit(project, StorageSource(project.storage))
    assert not report.ok
    assert "failed" in _files(report) and "longer" in _files(report), _files(report)
    with serve_dir(tmp_path / "repo") as base:
        over_http = _audit(project, HttpSource(base))
    assert not over_http.ok and "longer" in _files(over_http), _files(over_http)
    with pytest.raises(SecurityError, match="longer"):  # ota rollback's and deltas' reader
        read_file(entry, *storage_readers(project.storage))


def update_once_safe(dev: Path) -> tuple[str, int]:
    from ota.client import update_once

    r = update_once(dev)
    return r.status, r.exit_code


def test_a_folder_at_a_file_blob_key_is_a_failed_check_not_a_traceback(tmp_path: Path) -> None:
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    entry = _manifest(project, "1.0.0").file(MODEL)
    blob = _blob(tmp_path, entry.sha256)
    blob.unlink()
    blob.mkdir()
    with pytest.raises(LocalError):
        read_file(entry, *storage_readers(project.storage))
    report = _audit(project, StorageSource(project.storage))
    assert not report.ok
    assert _files(report).startswith("failed"), _files(report)


@pytest.mark.parametrize("fault", ["truncate", "reset"])
def test_a_source_that_cuts_a_body_short_is_transient_not_a_traceback(
    tmp_path: Path, fault: str
) -> None:
    """A hostile HTTP source announces a file blob range, sends part of it and hangs up (or
    resets): a ``TransientError`` (exit 6), and ``ota audit`` reports the files check failed."""
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    entry = _manifest(project, "1.0.0").file(MODEL)
    key = f"blobs/sha256/{entry.sha256[:2]}/{entry.sha256}"
    with http_faults.serve(tmp_path / "repo") as server:
        server.add(fault, entry.sha256, times=1000, after=100)
        source = HttpSource(server.url)
        with pytest.raises(TransientError):
            source.read_range(key, 0, entry.chunks[0].size)
        with pytest.raises(TransientError):
            source.read(key, entry.size)
        report = _audit(project, source)
    assert not report.ok
    assert _files(report).startswith("failed"), _files(report)


class _GcBetween(FileStorage):
    """A real file store in which ``ota gc`` deletes one blob right after the publisher saw
    it exist (the interleaving a concurrent gc can produce, made deterministic)."""

    def __init__(self, root: Path, victim: str) -> None:
        super().__init__(root)
        self.victim = victim

    def exists(self, key: str) -> bool:
        there = super().exists(key)
        if there and key == self.victim:
            (self.root / key).unlink()
        return there


def test_a_reused_file_blob_gc_deletes_meanwhile_is_stored_again(tmp_path: Path) -> None:
    """A publish reusing an unreferenced file blob (of a dropped release) that gc deletes
    between the publisher's check and its touch stores its own copy: the release never
    names a missing blob (with no chunk blobs, no device could install it)."""
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    entry = _manifest(project, "1.0.0").file(MODEL)
    blob = _blob(tmp_path, entry.sha256)
    data = blob.read_bytes()
    copy = blob.parent.parent / ".file.review.new"
    copy.write_bytes(data)  # what chunk_file wrote while hashing the same bytes
    store = _GcBetween(tmp_path / "repo", blob_key(entry.sha256))
    _store_copy(store, entry, copy)
    assert blob.is_file() and blob.read_bytes() == data


@pytest.mark.parametrize("grace", [float("nan"), -1.0])
def test_gc_refuses_a_grace_that_would_delete_a_publish_in_progress(
    tmp_path: Path, grace: float
) -> None:
    """NaN compares false with every age, a negative grace is below every age: either made
    gc delete the young blobs of a publish in progress (not yet named by any release)."""
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    young = tmp_path / "repo" / blob_key("ab" * 32)  # uploaded, its release not yet committed
    young.parent.mkdir(parents=True, exist_ok=True)
    young.write_bytes(b"a chunk of a publish in progress")
    with pytest.raises(InputError, match="grace"):
        gc(project, grace_seconds=grace)
    assert young.is_file()
    assert gc(project).kept_young == 1  # the default grace keeps it
    assert young.is_file()


def test_a_mirror_refuses_an_overlong_file_blob_and_serves_none_of_it(tmp_path: Path) -> None:
    """``ota mirror`` reads a file blob bounded by its signed size: a longer one is refused
    (``TooLarge``, exit 4); the mirror never holds it, so its devices never meet it."""
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    entry = _manifest(project, "1.0.0").file(MODEL)
    blob = _blob(tmp_path, entry.sha256)
    blob.write_bytes(blob.read_bytes() + b"\0")
    root = (tmp_path / "repo" / "metadata" / "1.root.json").read_bytes()
    with pytest.raises(TooLarge) as e:
        sync(StorageSource(project.storage), FileStorage(tmp_path / "mirror"), root)
    assert e.value.exit_code == ExitCode.SECURITY
    assert not (tmp_path / "mirror" / blob_key(entry.sha256)).exists()


@pytest.mark.parametrize("fault", ["norange", "overlong", "replace"])
def test_a_lying_http_source_gets_no_byte_into_an_audit_verdict(tmp_path: Path, fault: str) -> None:
    """A 200 to a range (the whole blob), a 206 with more bytes than asked, other bytes: each
    range of the file blob is refused or fails its chunk's sha256; the files check fails and
    nothing escapes as a traceback (confirmed without a change)."""
    project = _project(tmp_path)
    _publish(project, tmp_path, "1.0.0")
    entry = _manifest(project, "1.0.0").file(MODEL)
    with http_faults.serve(tmp_path / "repo") as server:
        server.add(fault, entry.sha256, times=1000, after=64, body=b"\0" * 4096)
        report = _audit(project, HttpSource(server.url))
    assert not report.ok
    assert _files(report).startswith("failed"), _files(report)
