"""Keep each multi-chunk file of a release also as one content-addressed blob (ADR 0014).

Devices fetch runs of adjacent missing chunks as ``Range`` requests of this blob (one request
per few MiB instead of one per chunk). It is stored at ``blob_key(file sha256)`` beside the
chunks; a one-chunk file needs none (its chunk blob has the file's digest already).

Invariants:

* the blob stored under a file's digest holds exactly the bytes of that digest: the source is
  copied and hashed in one pass, and the copy is discarded unless the hash is the one
  :func:`~ota.repository._chunker.chunk_file` found (a source changed in between is an error);
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
from ota.repository._storage import Storage

_BLOCK = 1 << 20


def store_file_blob(storage: Storage, source: Path, entry: FileEntry, scratch: Path) -> bool:
    """Store ``source`` (whose entry is ``entry``) as the blob of its digest if it has several
    chunks and the store lacks it. Returns whether it was written. ``scratch`` is a private
    folder for the temp copy when the store is not local.

    Raises:
        OSError: the source cannot be read, or no longer hashes to ``entry.sha256``.
        StorageError, TransientError, LocalError: the store failed.
    """
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
