"""Content-defined chunking (FastCDC) and deduplicating upload, in one pass over each file.

Each chunk is copied once out of the ``mmap``; those same bytes are hashed into the chunk digest,
fed to the whole-file sha256 (on a second thread: hashlib releases the GIL; the same thread
writes the file's whole-blob copy when asked, ADR 0014) and, unless the file blob is its only
stored form (ADR 0017: ``chunk_blobs=False``), uploaded. So every byte is read once and hashed
twice (file and chunk digests: the two trust anchors of ADR 0008), and what is uploaded and
copied is exactly what was hashed even if the source file changes underneath (the copy out of
the mapping costs ~0.02 s of CPU per 256 MiB: kept for this invariant). Chunk
boundaries depend on content, so an edit changes only the chunks it touches: the basis of delta
updates (``docs/adr/0001-bundle-format.md``).

Memory is bounded whatever the file size: at most ``_IN_FLIGHT`` chunks wait for upload and
``_HASH_QUEUE`` for the whole-file hash, and mapped pages already chunked are dropped from the
process every ``_RELEASE`` bytes (the mapping never holds the whole file resident).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ota._atomic import start_writeback
from ota.bundle import Chunk, FileEntry, blob_key
from ota.repository._storage import Storage

# Object stores charge per request: 1 MiB average chunks keep a 256 MiB model at ~256 objects
# while a 10 % fine-tune still costs ~10 % of the bytes (bench/delta_publish.py).
MIN_CHUNK = 256 * 1024
AVG_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
_IN_FLIGHT = 32  # chunks buffered for upload at most (<= 32 MiB)
_HASH_QUEUE = 16  # chunks waiting for the whole-file hash at most
# Mapped pages already chunked are dropped from this process every _RELEASE bytes: the page
# cache keeps them, but a mapping that grows to the whole file would count the model once more
# in our RSS (issue 13: peak RSS <= 1.3x the model + 200 MB).
_RELEASE = 16 * 1024 * 1024
# The file-blob copy is handed to writeback every _WRITEBACK bytes (advice to the kernel), so
# the publish's barrier (or the chunking child's fsync) waits for a tail, not the whole file:
# ~0.13 s of a fresh 256 MiB publish on this machine's disk (issue 13, ADR 0018).
_WRITEBACK = 8 * 1024 * 1024

Progress = Callable[[int], None]  # called with a number of bytes done


@dataclass
class UploadStats:
    """What a publish stored. ``bytes_uploaded`` is every byte written to the store: chunk
    and delta blobs, and the whole-file blobs (ADR 0014/0017), which ``file_blobs`` and
    ``file_blob_bytes`` count apart (a multi-chunk file is stored whole whenever its digest
    is new: chunk-level dedup saves device downloads, no longer storage)."""

    chunks_total: int = 0
    chunks_uploaded: int = 0
    bytes_total: int = 0
    bytes_uploaded: int = 0
    file_blobs: int = 0
    file_blob_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Uploader:
    """Uploads chunks the storage lacks, on a bounded thread pool.

    ``known`` are digests already stored (e.g. the chunks of the model's previous release),
    skipped without asking the storage. Use as a context manager; :meth:`close` waits for every
    upload, re-raises the first failure, and makes the blobs durable.
    """

    storage: Storage
    known: set[str] = field(default_factory=set)
    workers: int = 8
    stats: UploadStats = field(default_factory=UploadStats)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.workers)
        self._slots = threading.BoundedSemaphore(_IN_FLIGHT)
        self._futures: list[Future[int]] = []
        self._lock = threading.Lock()
        self._synced = False  # a barrier ran and no chunk was handed over since

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        else:
            self.close()

    def count(self, nbytes: int) -> None:
        """Count a chunk of the payload that is not stored as its own blob (ADR 0017: its
        file's blob holds it)."""
        self.stats.chunks_total += 1
        self.stats.bytes_total += nbytes

    def submit(self, digest: str, data: bytes, *, counted: bool = False) -> None:
        if not counted:
            self.count(len(data))
        with self._lock:
            if digest in self.known:
                return
            self.known.add(digest)
        self._slots.acquire()
        self._synced = False
        self._futures.append(self._pool.submit(self._one, digest, data))

    def _one(self, digest: str, data: bytes) -> int:
        try:
            # One request per chunk: put_blob is create-if-absent, no HEAD needed first.
            return len(data) if self.storage.put_blob(blob_key(digest), data) else 0
        finally:
            self._slots.release()

    def flush(self) -> None:
        """Wait for every submitted upload, re-raise the first failure, make blobs durable
        (the storage's barrier: also for blobs written beside the uploader since, such as
        ADR 0014 file blobs)."""
        futures, self._futures = self._futures, []
        for f in futures:
            n = f.result()
            if n:
                self.stats.chunks_uploaded += 1
                self.stats.bytes_uploaded += n
        self.storage.barrier()
        self._synced = True

    def close(self) -> None:
        """:meth:`flush`, unless nothing was handed over since the last one (publish flushes
        before its commit: a second machine-wide ``os.sync`` would only wait for other
        processes' writes), then stop the pool."""
        if not self._synced or self._futures:
            self.flush()
        self._pool.shutdown(wait=True)


def _release_behind(mm: mmap.mmap, released: int, offset: int) -> int:
    """Drop the mapped pages before ``offset`` (whole pages, every ``_RELEASE`` bytes) from this
    process (``MADV_DONTNEED``; a read-only file mapping reads them again from the file if
    touched). Returns the new released offset."""
    upto = offset - offset % mmap.PAGESIZE
    if upto - released < _RELEASE or not hasattr(mmap, "MADV_DONTNEED"):
        return released
    mm.madvise(mmap.MADV_DONTNEED, released, upto - released)
    return upto


def _open_copy(path: Path) -> BinaryIO:
    """The temp copy ``path`` (made empty by :func:`~ota.repository._fileblob.new_copy_path`),
    opened for writing only if it is still that: a regular file of ours with one link. Someone
    who can write the blob folder may have put a symlink, a hard link or a FIFO in its place
    since it was made (the chunking child opens it a process start later): writing through it
    would overwrite another file of the publisher's (its keys, say), or block.

    Raises:
        OSError: the path is no longer the copy it was made as.
    """
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise OSError(f"{path}: not the temp copy made for this publish; refused")
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)  # only now: a hard link's other name is never truncated
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


class _WholeFile:
    """The whole-file sha256 of the blocks put on ``feed`` (``None`` ends them), computed on
    its own thread (:meth:`run`), and the optional copy of those blocks at ``copy_to``. A
    failure is kept in ``failed`` and the feed drained, so the producer never blocks."""

    def __init__(self, copy_to: Path | None) -> None:
        self.copy_to = copy_to
        self.sha256 = hashlib.sha256()
        self.feed: queue.Queue[bytes | None] = queue.Queue(maxsize=_HASH_QUEUE)
        self.failed: list[BaseException] = []

    def run(self) -> None:
        out = None
        written = flushed = 0  # bytes of the copy written, and handed to writeback
        try:
            out = _open_copy(self.copy_to) if self.copy_to is not None else None
            while (block := self.feed.get()) is not None:
                self.sha256.update(block)
                if out is not None:
                    out.write(block)
                    written += len(block)
                    if written - flushed >= _WRITEBACK:  # the closing sync waits for a tail
                        out.flush()
                        start_writeback(out.fileno(), flushed, written - flushed)
                        flushed = written
        except BaseException as e:  # re-raised by chunk_file
            self.failed.append(e)
            while self.feed.get() is not None:
                pass
        finally:
            if out is not None:
                out.close()


def chunk_file(
    source: Path,
    bundle_path: str,
    uploader: Uploader | None = None,
    progress: Progress | None = None,
    copy_to: Path | None = None,
    *,
    chunk_blobs: bool = True,
) -> FileEntry:
    """Cut ``source`` into content-defined chunks, hash it, and hand each chunk to ``uploader``.

    With ``copy_to`` (a new file's path), the bytes are also written there, in order, by the
    thread that computes the whole-file sha256, from the same buffers: the copy holds exactly
    the bytes the returned digest names (``ota.repository._fileblob``, ADR 0014), without a
    second read and hash of the source. On any failure the copy is removed.

    ``chunk_blobs=False`` with ``copy_to`` (ADR 0017): the copy becomes the file's only stored
    form, so the chunks of a file of several chunks are hashed (the manifest's chunk index)
    but not handed to ``uploader``: every byte is written once. A file that turns out to be
    one chunk is still handed over whole (its chunk blob is its file blob).

    Raises:
        OSError: the file cannot be read, or the copy cannot be written.
    """
    from fastcdc import fastcdc  # publisher-only: a device (client extra) never chunks

    size = source.stat().st_size
    if size == 0:
        return FileEntry(bundle_path, hashlib.sha256(b"").hexdigest(), 0, ())
    whole = _WholeFile(copy_to)
    hasher = threading.Thread(target=whole.run, name="sha256-file", daemon=True)
    hasher.start()
    feed = whole.feed
    chunks: list[Chunk] = []
    # ADR 0017: no chunk blobs beside the file blob; the first chunk is kept until a second
    # one shows the file has several (a one-chunk file's only blob is its chunk blob)
    defer = uploader is not None and copy_to is not None and not chunk_blobs
    first: bytes | None = None
    try:
        try:
            with source.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                released = 0  # pages before this offset are dropped from our mapping
                for c in fastcdc(mm, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK, fat=False):
                    data = mm[c.offset : c.offset + c.length]
                    released = _release_behind(mm, released, c.offset)
                    feed.put(data)
                    digest = hashlib.sha256(data).hexdigest()
                    chunks.append(Chunk(digest, len(data)))
                    if defer:
                        uploader.count(len(data))  # type: ignore[union-attr]
                        first = data if len(chunks) == 1 else None
                    elif uploader is not None:
                        uploader.submit(digest, data)
                    if progress:
                        progress(len(data))
        finally:
            feed.put(None)
            hasher.join()
        if whole.failed:
            raise whole.failed[0]
        if sum(c.size for c in chunks) != size:
            raise OSError(f"{source} changed size while publishing")
        if first is not None and uploader is not None:
            uploader.submit(chunks[0].sha256, first, counted=True)  # its blob is the file's
    except BaseException:
        if copy_to is not None:
            copy_to.unlink(missing_ok=True)
        raise
    return FileEntry(bundle_path, whole.sha256.hexdigest(), size, tuple(chunks))
