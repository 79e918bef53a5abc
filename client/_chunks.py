"""Local chunk reuse and assembly of a release into a staging folder (DESIGN decision 2).

A device already holds most chunks of a fine-tuned or rolled-back release: in the current
slot, in the inactive (previous) slot, or in the leftovers of an interrupted attempt. The
:class:`ChunkIndex` maps chunk digests to places on disk, known from the manifests of those
slots; :func:`stage` writes every file of a new manifest, taking each chunk from disk when one
hashes right and from the network otherwise: runs of adjacent missing chunks as one ``Range``
of the file's blob (ADR 0014): a short run into a reused buffer, several at once; a run longer
than ``max_span`` (a whole file, in a full install) streamed straight into the file through a
small ring of buffers; or chunk blobs where the store has no file blob or ignores ranges.

Invariants:

* every byte read from disk or from a chunk blob comes from a chunk whose sha256 was verified
  just before it is written (disk content is not trusted blindly); bytes of a span are
  verified once, by the file's sha256, and until then exist only under the file's dot temp
  name (which the chunk index re-hashes chunk by chunk before any reuse);
* every staged file's sha256 and size are verified against the manifest before it gets its
  final name (each byte hashed once for it, beside its write; every queued hash is awaited
  before the file is judged); files are fsynced once, at their end, made read-only, and their
  folders fsynced;
* memory is bounded whatever the bundle's size: ``max_inflight_bytes`` of pieces in flight
  plus the stream ring (``stream_buffers`` x ``stream_buffer``);
* nothing outside the staging folder is written (bundle paths are validated by the manifest
  parser, temp names start with a dot, which no bundle path may).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ota._atomic import fsync_dir, start_writeback
from ota.bundle import FileEntry, Manifest
from ota.errors import LocalError, SecurityError

from ._fetch import BlobFetcher, FetchConfig
from ._spans import Piece, plan

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WRITEBACK = 8 * 1024 * 1024


@dataclass
class StageStats:
    """What staging cost: bytes from the network versus reused from disk."""

    files: int = 0
    bytes_total: int = 0
    bytes_downloaded: int = 0
    bytes_reused: int = 0
    bytes_linked: int = 0
    chunks_downloaded: int = 0
    chunks_reused: int = 0

    @property
    def bytes_staged(self) -> int:
        return self.bytes_downloaded + self.bytes_reused + self.bytes_linked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChunkIndex:
    """Where chunks and whole files may be found on this device. Lookups verify hashes."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[tuple[Path, int]]] = {}
        self._files: dict[str, list[Path]] = {}

    def __len__(self) -> int:
        return len(self._chunks)

    def add_tree(self, root: Path, manifest: Manifest, *, whole_files: bool = True) -> None:
        """Index the files of a slot laid out by ``manifest`` (missing files are skipped)."""
        for f in manifest.files:
            path = root / f.path
            try:
                length = path.stat().st_size
            except OSError:
                continue
            if whole_files and length == f.size:
                self._files.setdefault(f.sha256, []).append(path)
            self._add_chunks(path, f, length)

    def add_partial(self, root: Path, manifest: Manifest) -> None:
        """Index the leftovers of an interrupted staging of ``manifest`` (final or temp names),
        up to the length each file reached."""
        for f in manifest.files:
            for path in (root / f.path, root / _temp_name(f.path)):
                try:
                    length = path.stat().st_size
                except OSError:
                    continue
                self._add_chunks(path, f, length)

    def _add_chunks(self, path: Path, f: FileEntry, length: int) -> None:
        offset = 0
        for c in f.chunks:
            if offset + c.size > length:
                break
            self._chunks.setdefault(c.sha256, []).append((path, offset))
            offset += c.size

    def has(self, sha256: str) -> bool:
        """Whether some place may hold the chunk (not verified: :meth:`read_chunk` is)."""
        return sha256 in self._chunks

    def read_chunk(self, sha256: str, size: int) -> bytes | None:
        """Bytes of a chunk from disk if some indexed place holds them intact, else None."""
        for path, offset in self._chunks.get(sha256, ()):
            try:
                with path.open("rb") as fh:
                    fh.seek(offset)
                    data = fh.read(size)
            except OSError:
                continue
            if len(data) == size and hashlib.sha256(data).hexdigest() == sha256:
                return data
        return None

    def whole_file(self, entry: FileEntry) -> Path | None:
        """An indexed file with exactly ``entry``'s content (re-hashed), or None."""
        for path in self._files.get(entry.sha256, ()):
            try:
                if path.stat().st_size == entry.size and _sha256_file(path) == entry.sha256:
                    return path
            except OSError:
                continue
        return None

    def linkable_bytes(self, manifest: Manifest) -> int:
        """Bytes of ``manifest`` that whole-file reuse could hard-link (no hashing)."""
        return sum(f.size for f in manifest.files if f.sha256 in self._files)


def stage(manifest: Manifest, dest: Path, index: ChunkIndex, fetcher: BlobFetcher,
          cfg: FetchConfig, *, on_file: Callable[[str], None] | None = None,
          on_bytes: Callable[[int, int], None] | None = None) -> StageStats:
    """Write every file of ``manifest`` under ``dest`` (an empty folder), verified.

    Whole files already on the device are hard-linked (or copied) after re-hashing; other
    files are assembled chunk by chunk from disk or network, with up to ``cfg.parallel``
    chunks in flight, in order. ``on_file`` is called with each completed path, ``on_bytes``
    with (bytes staged so far, bundle size) after every chunk or linked file (progress only:
    it decides nothing).

    Raises:
        SecurityError: a chunk or file does not match the manifest.
        TransientError: the network failed after bounded retries.
        LocalError: the disk is full or the folder cannot be written.
    """
    stats = StageStats(bytes_total=manifest.total_size)
    pending: list[FileEntry] = []
    try:
        for f in manifest.files:
            target = dest / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            src = index.whole_file(f)
            if src is None:
                pending.append(f)
                continue
            _link_or_copy(src, target)
            stats.bytes_linked += f.size
            stats.files += 1
            if on_file:
                on_file(f.path)
            if on_bytes:
                on_bytes(stats.bytes_staged, stats.bytes_total)
        _Assembler(dest, index, fetcher, cfg, stats, on_file, on_bytes).run(pending)
        for d in sorted({(dest / f.path).parent for f in manifest.files}, reverse=True):
            fsync_dir(d)
        fsync_dir(dest)
    except OSError as e:
        raise _local(e, dest) from e
    return stats


@dataclass
class _Assembler:
    """Reads or fetches the pieces of each file with a bounded window of workers, writes them
    in order.

    A piece is a chunk the device may hold (read from disk, re-hashed) or, when the fetcher
    may use ranges, a span of adjacent missing chunks (one ``Range`` of the file blob; ADR
    0014). Span bytes are verified once, by the file's sha256 as :class:`_FileWriter` writes
    them; when the store has no file blob or ignores ``Range``, the span's chunk blobs are
    fetched instead, each verified on arrival as before.
    """

    dest: Path
    index: ChunkIndex
    fetcher: BlobFetcher
    cfg: FetchConfig
    stats: StageStats
    on_file: Callable[[str], None] | None
    on_bytes: Callable[[int, int], None] | None = None

    def pieces(self, f: FileEntry) -> list[Piece]:
        if not self.cfg.spans or len(f.chunks) < 2:
            # one-chunk files: the chunk blob is the file blob, a range of it gains nothing
            return plan(f, lambda _: True, 0)  # every chunk alone, as before
        return plan(f, self.index.has, max(self.cfg.max_stream, self.cfg.max_span, 1))

    def streamed(self, p: Piece) -> bool:
        """A span longer than ``max_span`` is streamed into its file when its turn comes,
        not buffered: memory stays the ring's, whatever its length."""
        return not p.local and p.size > self.cfg.max_span

    def get(self, f: FileEntry, p: Piece, buf: bytearray | None = None) -> _Got:
        if p.local:
            c = p.chunks[0]
            on_disk = self.index.read_chunk(c.sha256, c.size)
            if on_disk is not None:
                return _Got(on_disk, reused=1)
            return _Got(self._fetch_chunk(f, p), downloaded=1)
        out = memoryview(buf)[: p.size] if buf is not None else None
        span = self.fetcher.fetch_span(f.sha256, f.size, p.offset, p.size, out)
        if span is None:  # no file blob, or no ranges: the chunk blobs, each verified
            joined = bytearray()
            for c in p.chunks:
                joined += self.fetcher.fetch(c.sha256, c.size)
            return _Got(joined, downloaded=len(p.chunks), buf=buf)
        return _Got(span, downloaded=len(p.chunks), buf=buf)

    def _fetch_chunk(self, f: FileEntry, p: Piece) -> bytearray:
        """One chunk the device thought it held but could not read back intact: as its range
        of the file blob where the store has one (ADR 0017: a release may store its chunks
        only there), verified here as a chunk, else its chunk blob (verified by ``fetch``).

        Raises:
            SecurityError: the range's bytes are not the chunk (or as ``fetch_span``).
        """
        c = p.chunks[0]
        if self.cfg.spans and len(f.chunks) > 1:
            span = self.fetcher.fetch_span(f.sha256, f.size, p.offset, c.size)
            if span is not None:
                if hashlib.sha256(span).hexdigest() != c.sha256:
                    raise SecurityError(f"chunk {c.sha256[:16]}... of {f.path} failed "
                                        "verification")  # fmt: skip
                return bytearray(span)
        return self.fetcher.fetch(c.sha256, c.size)

    def run(self, files: list[FileEntry]) -> None:
        jobs = ((f, p, i == len(ps) - 1) for f in files for ps in [self.pieces(f)]
                for i, p in enumerate(ps))
        writer: _FileWriter | None = None
        buffers = _Buffers(max(self.cfg.max_span, 1),
                           max(self.cfg.max_inflight_bytes // max(self.cfg.max_span, 1), 1))
        ring = _Ring(max(self.cfg.stream_buffer, 1), max(self.cfg.stream_buffers, 2))
        with (
            ThreadPoolExecutor(max_workers=max(self.cfg.parallel, 1)) as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher,
        ):
            window = _Window(self, pool, jobs, buffers)
            try:
                while (item := window.next()) is not None:
                    f, p, last, fut = item
                    if writer is None or p.offset == 0:
                        writer = _FileWriter(self.dest, f, hasher, ring)
                    if fut is None:
                        self._stream(writer, f, p, pool)
                    else:
                        got = fut.result()
                        self._write(writer, got)
                        buffers.give(got.buf)
                    if last:
                        self._finish(writer)
                        writer = None
            except BaseException:
                window.cancel()
                if writer is not None:
                    writer.abort()
                raise
        for f in files:  # empty files have no chunks
            if not f.chunks:
                self._finish(_FileWriter(self.dest, f))

    def _stream(self, writer: _FileWriter, f: FileEntry, p: Piece,
                pool: ThreadPoolExecutor) -> None:
        """One long span: streamed straight into the file (one range, hashed beside the
        write, ADR 0014), or, when the store has no usable file blob, its chunk blobs,
        several at once, each verified on arrival, written in order."""
        sink = _Progressing(writer, self._progress)
        if self.fetcher.stream_span(f.sha256, f.size, p.offset, p.size, sink):
            self.stats.bytes_downloaded += p.size - sink.reported
            self.stats.chunks_downloaded += len(p.chunks)
            self._progress(0)
            return
        window: deque[tuple[int, Future[bytearray]]] = deque()
        chunks = iter(p.chunks)
        held = 0
        while True:
            for c in chunks:
                window.append((c.size, pool.submit(self.fetcher.fetch, c.sha256, c.size)))
                held += c.size
                if len(window) >= self.cfg.parallel or held >= self.cfg.max_inflight_bytes:
                    break
            if not window:
                return
            size, fut = window.popleft()
            held -= size
            self._write(writer, _Got(fut.result(), downloaded=1))

    def _progress(self, nbytes: int) -> None:
        self.stats.bytes_downloaded += nbytes
        if self.on_bytes:
            self.on_bytes(self.stats.bytes_staged, self.stats.bytes_total)

    def _write(self, writer: _FileWriter, got: _Got) -> None:
        writer.write(got.data)
        if got.reused:
            self.stats.bytes_reused += len(got.data)
            self.stats.chunks_reused += got.reused
        else:
            self.stats.bytes_downloaded += len(got.data)
            self.stats.chunks_downloaded += got.downloaded
        if self.on_bytes:
            self.on_bytes(self.stats.bytes_staged, self.stats.bytes_total)

    def _finish(self, writer: _FileWriter) -> None:
        writer.finish()
        self.stats.files += 1
        if self.on_file:
            self.on_file(writer.entry.path)


_Item = tuple[FileEntry, Piece, bool, "Future[_Got] | None"]


class _Window:
    """The pieces in flight, in order: at most ``2 * parallel`` of them and
    ``max_inflight_bytes`` of buffered bytes (peak memory stays flat). A piece streamed into
    its file (no future) costs no buffer: it is fetched when its turn comes."""

    def __init__(self, asm: _Assembler, pool: ThreadPoolExecutor,
                 jobs: Iterator[tuple[FileEntry, Piece, bool]], buffers: _Buffers) -> None:
        self.asm, self.pool, self.jobs, self.buffers = asm, pool, jobs, buffers
        self.size = max(2 * asm.cfg.parallel, 2)
        self.inflight: deque[_Item] = deque()
        self.buffered = 0
        self.pending: tuple[FileEntry, Piece, bool] | None = None

    def next(self) -> _Item | None:
        """The next piece in order (its future, or None to stream it), after topping up."""
        while len(self.inflight) < self.size:
            self.pending = self.pending or next(self.jobs, None)
            if self.pending is None:
                break
            f, p, last = self.pending
            cost = 0 if self.asm.streamed(p) else p.size
            if self.inflight and self.buffered + cost > self.asm.cfg.max_inflight_bytes:
                break
            fut = None
            if cost:
                buf = None if p.local else self.buffers.take(p.size)
                fut = self.pool.submit(self.asm.get, f, p, buf)
            self.inflight.append((f, p, last, fut))
            self.buffered += cost
            self.pending = None
        if not self.inflight:
            return None
        item = self.inflight.popleft()
        if item[3] is not None:
            self.buffered -= item[1].size
        return item

    def cancel(self) -> None:
        for *_, fut in self.inflight:
            if fut is not None:
                fut.cancel()


class _Buffers:
    """Reused span buffers, taken and given back by the assembling thread only: at most
    ``count`` of ``size`` bytes each (peak memory is fixed, and no span faults in fresh pages).
    A span that fits none gets None (the fetcher allocates it)."""

    def __init__(self, size: int, count: int) -> None:
        self.size, self.count = size, count
        self.spare: list[bytearray] = []

    def take(self, n: int) -> bytearray | None:
        if n > self.size:
            return None
        if self.spare:
            return self.spare.pop()
        if self.count > 0:
            self.count -= 1
            return bytearray(self.size)
        return None

    def give(self, buf: bytearray | None) -> None:
        if buf is not None:
            self.spare.append(buf)


class _Ring:
    """``count`` stream buffers of ``size`` bytes, allocated on first use, lent in turn; the
    hash of the bytes last read into a buffer is awaited before it is lent again."""

    def __init__(self, size: int, count: int) -> None:
        self.size, self.count = size, count
        self.bufs: list[memoryview] = []
        self.hashed: list[Future[None] | None] = []
        self.next = 0

    def lend(self) -> tuple[int, memoryview]:
        if len(self.bufs) < self.count:
            self.bufs.append(memoryview(bytearray(self.size)))
            self.hashed.append(None)
        i = self.next
        self.next = (i + 1) % self.count
        if (fut := self.hashed[i]) is not None:
            fut.result()
            self.hashed[i] = None
        return i, self.bufs[i]


class _Progressing:
    """The :class:`SpanSink` of a streamed span: a file writer, plus progress every
    ``_WRITEBACK`` bytes (``report`` takes the bytes since the last report)."""

    def __init__(self, writer: _FileWriter, report: Callable[[int], None]) -> None:
        self.writer, self.report = writer, report
        self.given = self.reported = 0

    def buffer(self) -> memoryview:
        return self.writer.buffer()

    def commit(self, data: memoryview) -> None:
        self.writer.commit(data)
        self.given += len(data)
        if self.given - self.reported >= _WRITEBACK:
            self.report(self.given - self.reported)
            self.reported = self.given


@dataclass
class _Got:
    """A piece's bytes and how many chunks they came as (from disk or from the network)."""

    data: bytes | bytearray | memoryview
    reused: int = 0
    downloaded: int = 0
    buf: bytearray | None = None  # the reusable span buffer behind ``data``, if any


class _FileWriter:
    """Writes one file under a temp name, hashing as it goes; publishes it only if verified.

    Every ``_WRITEBACK`` bytes the kernel is asked to start writing the file out (advice only:
    it never blocks), so the ``fsync`` that ends the file waits for a tail, not for the whole
    file, and a large bundle never piles up hundreds of MB of dirty pages on a small device.
    """

    def __init__(self, dest: Path, entry: FileEntry,
                 hasher: ThreadPoolExecutor | None = None, ring: _Ring | None = None) -> None:
        self.entry = entry
        self.hasher = hasher
        self.ring = ring
        self.lent = -1  # the ring buffer last lent by buffer()
        self.hashing: Future[None] | None = None  # the last hash queued by commit()
        self.final = dest / entry.path
        self.tmp = dest / _temp_name(entry.path)
        self.h = hashlib.sha256()
        self.size = 0
        self.flushed = 0  # bytes handed to writeback
        self.fh: BinaryIO = self.tmp.open("wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # The hash (on its own thread) and the write run at once: both release the GIL, so a
        # piece costs the longer of the two, not their sum. The hash is awaited before the
        # next piece (order) and before the caller may reuse ``data``'s buffer.
        hashed = self.hasher.submit(self.h.update, data) if self.hasher else None
        self.fh.write(data)
        if hashed is None:
            self.h.update(data)
        else:
            hashed.result()
        self.hashing = None  # the hasher runs in order: every earlier hash is done too
        self._written(len(data))

    def buffer(self) -> memoryview:
        """A ring buffer to read the next streamed bytes into (:class:`SpanSink`)."""
        if self.ring is None or self.hasher is None:
            raise RuntimeError("this writer streams nothing")
        self.lent, view = self.ring.lend()
        return view

    def commit(self, data: memoryview) -> None:
        """Write the bytes just read into the lent buffer and queue their hash, without
        waiting for it: the hash runs beside the next read and write, and the buffer is
        lent again only once it is done (:class:`_Ring`)."""
        if self.ring is None or self.hasher is None or self.lent < 0:
            raise RuntimeError("commit without a lent buffer")
        fut = self.hasher.submit(self.h.update, data)
        self.ring.hashed[self.lent] = self.hashing = fut
        self.lent = -1
        self.fh.write(data)
        self._written(len(data))

    def _written(self, n: int) -> None:
        self.size += n
        if self.size - self.flushed >= _WRITEBACK:
            start_writeback(self.fh.fileno(), self.flushed, self.size - self.flushed)
            self.flushed = self.size

    def finish(self) -> None:
        if self.hashing is not None:
            self.hashing.result()
            self.hashing = None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if self.size != self.entry.size or self.h.hexdigest() != self.entry.sha256:
            raise SecurityError(f"file {self.entry.path} does not match its manifest digest")
        os.chmod(self.tmp, 0o444)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        self.fh.close()


def _temp_name(path: str) -> str:
    head, _, base = path.rpartition("/")
    return f"{head}/.{base}.part" if head else f".{base}.part"


def _link_or_copy(src: Path, target: Path) -> None:
    try:
        os.link(src, target)
    except OSError:
        shutil.copyfile(src, target)
        with target.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(target, 0o444)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _local(e: OSError, where: Path) -> LocalError:
    if e.errno in _DISK_FULL:
        return LocalError(f"disk full while staging into {where}",
                          remedy="free disk space; the committed model is untouched")
    return LocalError(f"cannot stage into {where}: {e}")
