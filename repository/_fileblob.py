"""Keep each multi-chunk file of a release also as one content-addressed blob (ADR 0014).

Devices fetch runs of adjacent missing chunks as ``Range`` requests of this blob (one request
per few MiB instead of one per chunk). It is stored at ``blob_key(file sha256)`` beside the
chunks; a one-chunk file needs none (its chunk blob has the file's digest already).

Invariants:

* the blob stored under a file's digest holds exactly the bytes of that digest: either the copy
  :func:`~ota.repository._chunker.chunk_file` wrote from the very buffers it hashed into that
  digest (``copy_to``, made by :func:`blob_copy_path`: the publish path, one read and one
  whole-file hash per file), or the source copied and hashed again in one pass, the copy
  discarded unless the hash is the entry's (a source changed in between is an error);
* readers never see a partial blob: a dot-named temp file is renamed into place (file backend,
  durable at the uploader's ``barrier``) or uploaded whole (S3 completes multipart atomically);
* an existing blob is left as it is (content-addressed: same key, same bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from ota.bundle import FileEntry, blob_key
from ota.repository._chunker import MIN_CHUNK
from ota.repository._storage import Storage

_BLOCK = 1 << 20
_BLOB_ROOT = "blobs/sha256"  # blob_key's folder: temp copies beside the blobs' 2-char folders


def blob_copy_path(storage: Storage, source: Path, scratch: Path) -> Path | None:
    """A new empty dot-named temp file for :func:`~ota.repository._chunker.chunk_file`'s
    ``copy_to``, on the repository's file system (so it can be renamed into place) or in
    ``scratch`` for a remote store; None when ``source`` is too small to need a file blob (one
    chunk at most). Hand the result to :func:`store_file_blob`, which always removes it."""
    if source.stat().st_size <= MIN_CHUNK:
        return None
    return new_copy_path(copy_folder(storage, scratch))


def copy_folder(storage: Storage, scratch: Path) -> Path:
    """Where :func:`blob_copy_path` puts its temp copies: the blob folder of a local
    repository (renamed into place from there), else ``scratch``."""
    root = storage.local_root()
    return root / _BLOB_ROOT if root is not None else scratch


def local_copy_folder(repository_root: Path) -> Path:
    """:func:`copy_folder` of the local repository at ``repository_root``."""
    return repository_root / _BLOB_ROOT


def new_copy_path(folder: Path) -> Path:
    """A new empty dot-named temp file in ``folder`` (made if needed), swept by
    :func:`sweep_temp` if its publisher dies."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".file.", suffix=".new", dir=folder)
    os.close(fd)
    return Path(name)


def store_file_blob(
    storage: Storage, source: Path, entry: FileEntry, scratch: Path, copy: Path | None = None
) -> bool:
    """Store ``source`` (whose entry is ``entry``) as the blob of its digest if it has several
    chunks and the store lacks it. Returns whether it was written. ``scratch`` is a private
    folder for the temp copy when the store is not local. ``copy``: the copy ``chunk_file``
    wrote while computing ``entry`` (see :func:`blob_copy_path`), used instead of reading the
    source again, and removed in every case.

    Raises:
        OSError: the source cannot be read, or no longer hashes to ``entry.sha256``; the copy
            is not ``entry.size`` bytes.
        StorageError, TransientError, LocalError: the store failed.
    """
    if copy is not None:
        try:
            return _store_copy(storage, entry, copy)
        finally:
            copy.unlink(missing_ok=True)
    if len(entry.chunks) < 2:
        return False
    key = blob_key(entry.sha256)
    if storage.exists(key):
        return False
    root = storage.local_root()
    folder = (root / key).parent if root is not None else scratch
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{entry.sha256}.", suffix=".new", dir=folder)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            h = hashlib.sha256()
            n = 0
            while block := src.read(_BLOCK):
                h.update(block)
                out.write(block)
                n += len(block)
        if n != entry.size or h.hexdigest() != entry.sha256:
            raise OSError(f"{source} changed while publishing")
        if root is not None:
            os.chmod(tmp, 0o644)
            os.replace(tmp, root / key)  # durable at the uploader's barrier (os.sync)
        else:
            storage.put_file(key, tmp)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return True


def _store_copy(storage: Storage, entry: FileEntry, copy: Path) -> bool:
    """Put ``copy`` (written by ``chunk_file`` from the bytes it hashed into ``entry``) under
    the blob key of ``entry.sha256``; the caller removes ``copy`` afterwards."""
    if len(entry.chunks) < 2:
        return False
    key = blob_key(entry.sha256)
    if storage.exists(key) and _touch(storage, key):
        return False  # else gc removed it between the two calls: store the copy after all
    if copy.stat().st_size != entry.size:
        raise OSError(f"the copy of {entry.path} is not {entry.size} bytes")
    root = storage.local_root()
    if root is not None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        os.chmod(copy, 0o644)
        os.replace(copy, root / key)  # durable at the uploader's barrier (os.sync)
    else:
        storage.put_file(key, copy)
    return True


def _touch(storage: Storage, key: str) -> bool:
    """Make an existing blob young again (file backend) so that ``ota gc``'s grace keeps it
    while this publish commits a release naming it: it may be the unreferenced blob of a
    dropped release (ADR 0017: a whole file, not one chunk, is then at stake). False when the
    blob is gone by now (a gc deleted it after the caller saw it): the caller stores its copy
    rather than commit a release naming a missing blob. S3: no touch (see threat model)."""
    root = storage.local_root()
    if root is not None:
        try:
            os.utime(root / key)
        except FileNotFoundError:
            return False
        except OSError:
            pass  # a read-only mtime: the blob is there, gc's grace is all that is lost
    return True


def sweep_temp(storage: Storage, grace_seconds: float, *, dry_run: bool = False) -> int:
    """Remove the dot-named temp copies (:func:`blob_copy_path`) a killed publisher left in a
    local repository's blob folder, older than ``grace_seconds`` (a publish in progress
    keeps its own). Returns how many. No device ever reads them (dot names are not blob keys).
    """
    root = storage.local_root()
    folder = root / _BLOB_ROOT if root is not None else None
    if folder is None or not folder.is_dir():
        return 0
    import time

    n = 0
    now = time.time()
    for tmp in folder.glob(".file.*.new"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime >= grace_seconds:
                if not dry_run:
                    tmp.unlink()
                n += 1
    return n
