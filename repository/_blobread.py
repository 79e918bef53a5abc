"""Read a release file's chunks from whichever layout stored them (ADR 0017).

A multi-chunk file is stored as one file blob (``blob_key(file sha256)``, ADR 0014); since ADR
0017 that is its only stored form unless the repository keeps chunk blobs too
(``chunk_blobs = true``), and releases published before ADR 0014 have chunk blobs only. A
one-chunk file's chunk blob is its file blob in every layout. The server-side readers of
payload bytes (offline media, ``ota audit``, binary deltas, ``ota rollback``) read through
here, so each works on every layout.

Invariants:

* :func:`iter_chunks` yields each chunk of the entry in order, exactly its signed size, and
  only after its sha256 matched the manifest's chunk digest, whichever blob it came from: a
  store never gets unverified bytes through, and the caller may trust each chunk as the
  manifest's;
* a multi-chunk file is read as ranges of its file blob first; a file blob that is absent
  (``NotFound``) switches the rest of the file to chunk blobs (an old layout), never the
  other way round mid-chunk; a chunk found in neither raises ``NotFound``;
* a file blob read to the end must end there: one longer than its file (the right bytes and
  more) is refused like a tampered one, since every device refuses it (its ``Content-Range``
  total is not the file's size, ADR 0014), so no reader may call it sound.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

from ota.bundle import Chunk, FileEntry, blob_key
from ota.errors import LocalError, SecurityError
from ota.repository._storage import NotFound, Storage

ReadBlob = Callable[[str, int], bytes]  # (key, max bytes) -> the whole blob; NotFound if absent
ReadRange = Callable[[str, int, int], bytes]  # (key, start, end) -> bytes [start, end)


def storage_range(storage: Storage, key: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of blob ``key`` in ``storage`` (fewer if the blob is shorter).

    Raises:
        NotFound: no such blob. StorageError, TransientError: the store failed.
    """
    root = storage.local_root()
    if root is not None:
        try:
            with (root / key).open("rb") as f:
                f.seek(start)
                return f.read(end - start)
        except FileNotFoundError as e:
            raise NotFound(key) from e
        except OSError as e:  # a folder or an unreadable file at a blob's key
            raise LocalError(f"cannot read {root / key}: {e.strerror}") from e
    get_range = getattr(storage, "get_range", None)
    if get_range is not None:
        data: bytes = get_range(key, start, end)
        return data
    return storage.get(key, max_bytes=end)[0][start:end]


def iter_chunks(
    f: FileEntry, read: ReadBlob, read_range: ReadRange
) -> Iterator[tuple[Chunk, bytes]]:
    """Each chunk of ``f`` with its bytes, in order, verified (see the module's invariants).

    Raises:
        NotFound: a chunk is in neither its chunk blob nor the file blob.
        SecurityError: stored bytes differ from the chunk's address or size, or the file
            blob read is longer than the file (raised once the last chunk was taken).
        LocalError: a local blob cannot be read (a folder, no permission).
    """
    ranged = len(f.chunks) > 1
    offset = 0
    for c in f.chunks:
        data: bytes | None = None
        if ranged:
            try:
                data = read_range(blob_key(f.sha256), offset, offset + c.size)
            except NotFound:
                ranged = False  # no file blob: an old layout, the chunk blobs hold the bytes
        if data is None:
            data = read(blob_key(c.sha256), c.size)
        if len(data) != c.size or hashlib.sha256(data).hexdigest() != c.sha256:
            where = f"the file blob of {f.path}" if ranged else "its blob"
            raise SecurityError(f"chunk {c.sha256[:12]} of {f.path} in {where} differs "
                                "from its address or size")  # fmt: skip
        offset += c.size
        yield c, data
    if ranged and read_range(blob_key(f.sha256), f.size, f.size + 1):
        raise SecurityError(f"the file blob of {f.path} is longer than its {f.size} bytes "
                            "(devices refuse it)")  # fmt: skip


def read_file(f: FileEntry, read: ReadBlob, read_range: ReadRange) -> bytes:
    """The whole file ``f``, every chunk and the file digest verified (small files only: it
    is held in memory).

    Raises:
        NotFound, SecurityError: as :func:`iter_chunks`; SecurityError also when the
        file's sha256 differs.
    """
    h = hashlib.sha256()
    parts = []
    for _, data in iter_chunks(f, read, read_range):
        h.update(data)
        parts.append(data)
    out = b"".join(parts)
    if len(out) != f.size or h.hexdigest() != f.sha256:
        raise SecurityError(f"stored {f.path} does not match its manifest")
    return out


def storage_readers(storage: Storage) -> tuple[ReadBlob, ReadRange]:
    """The two readers of :func:`iter_chunks` over ``storage``."""

    def read(key: str, max_bytes: int) -> bytes:
        return storage.get(key, max_bytes=max_bytes)[0]

    def read_range(key: str, start: int, end: int) -> bytes:
        return storage_range(storage, key, start, end)

    return read, read_range


def has_file_blob(storage: Storage, f: FileEntry) -> bool:
    """Whether ``storage`` holds ``f``'s file blob (False for a one-chunk file: its chunk
    blob is checked by the chunk readers)."""
    if len(f.chunks) < 2:
        return False
    with contextlib.suppress(NotFound):
        return storage.exists(blob_key(f.sha256))
    return False
