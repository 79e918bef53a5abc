"""Chunk and hash the model file in a child process (issue 13: a fresh publish's critical path).

FastCDC's scan holds the GIL (0.2 s per 256 MiB here), and so do the imports a fresh
``ota publish`` runs beside the chunking (python-tuf, onnx, the signers, the CycloneDX
validator: ~0.4 s). In one process they take turns; in a child the scan and both SHA-256
passes run on the other core while this process imports, checks and runs the golden model.
The CLI starts the child before it imports anything heavy (:func:`prestart`), and the publish
adopts it (:func:`take`) when it turns out to be the job it needs; otherwise the publish starts
its own (:meth:`ChunkJob.start`) or chunks in-process as before.

The child runs :func:`ota.repository._chunker.chunk_file` on the file, with the file-blob copy
(ADR 0014/0017) written by it, and nothing uploaded: the job is used only where that copy is the
file's only stored form (``file_blobs = true``, ``chunk_blobs = false``: the defaults) and the
file is longer than ``MAX_CHUNK`` (so it has at least two chunks, and needs no chunk blob).

Invariants:

* the entry returned holds exactly what the child hashed and wrote to the copy: the same code
  as the in-process path, in another process; the copy is fsynced by the child before it
  reports (so the publish's barrier does not wait for it afterwards);
* the parent checks the child's report before using it: bounded in size, well-formed, one
  lowercase hex SHA-256 per chunk, chunk sizes within FastCDC's bounds, their sum the file's
  size; anything else fails the publish (:class:`ChunkJobError`, an ``OSError`` as the
  in-process path raises) and removes the copy;
* a job that is not adopted, or is cancelled, is killed and its copy removed, also at exit of
  the process that started it (``atexit``); a killed publisher's copy is a dot-named temp file
  that ``ota gc`` sweeps (:func:`ota.repository._fileblob.sweep_temp`).

Protocol (child stdout): a line ``+N`` per 16 MiB or so chunked (progress, N bytes), then one
line ``=`` + JSON ``{"sha256", "size", "chunks": [[sha256, size], ...]}``; exit status 0. A
failure: exit status 1 and one line on stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ota.bundle import Chunk, FileEntry
from ota.errors import LocalError

__all__ = ["ChunkJob", "ChunkJobError", "cancel_unadopted", "prestart", "take"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_PROGRESS_EVERY = 16 * 1024 * 1024
_MAX_LINE = 1 << 16  # a progress line, or the head of the report
_MAX_DIGITS = 20  # a progress figure (int() of more than 4300 digits raises ValueError)
_STDERR_TAIL = 4096  # what is kept of the child's stderr (drained, so it never blocks)
# Fixed part of the report plus, per chunk, at most '["<64 hex>", <20 digits>], '.
_REPORT_BASE, _REPORT_PER_CHUNK = 4096, 100


class ChunkJobError(LocalError, OSError):
    """The chunking child failed, or reported something malformed. A :class:`LocalError`
    (exit code 6, a clean one-line error from the CLI, never a traceback) that is still the
    ``OSError`` the in-process chunker raises for the same causes."""


class ChunkJob:
    """One file being chunked by a child process into ``copy`` (see module)."""

    def __init__(
        self,
        source: Path,
        copy: Path,
        size: int,
        proc: subprocess.Popen[bytes],
        identity: tuple[int, ...] | None = None,
    ) -> None:
        self.source, self.copy, self.size = source, copy, size
        self.identity = identity  # the source's _identity() when the child was started
        self._proc = proc
        self._lock = threading.Lock()
        self._done = False
        # stderr is drained as the child writes it (only its tail kept): a child that wrote
        # more than a pipe holds (64 KiB) would otherwise block on it, and the parent on stdout
        self._err = bytearray()
        self._drain: threading.Thread | None = None
        if proc.stderr is not None:
            self._drain = threading.Thread(target=self._drain_stderr, name="chunkjob-stderr",
                                           daemon=True)  # fmt: skip
            self._drain.start()
        atexit.register(self.cancel)

    def _drain_stderr(self) -> None:
        stream = self._proc.stderr
        assert stream is not None
        with contextlib.suppress(OSError, ValueError):
            while block := os.read(stream.fileno(), 65536):
                self._err += block
                del self._err[:-_STDERR_TAIL]

    @classmethod
    def start(cls, source: Path, copy: Path) -> ChunkJob:
        """Start chunking ``source`` (a regular file) into the new empty file ``copy``.

        Raises:
            OSError: the file cannot be examined, or the child cannot be started.
        """
        st = source.stat()
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "ota.repository._chunkjob", str(source), str(copy)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
        return cls(source, copy, st.st_size, proc, _identity(st))

    def result(self, progress: Callable[[int], None] | None = None) -> FileEntry:
        """Wait for the child; its entry for the file, checked (see module). ``progress`` is
        called with the bytes done as the child reports them; an exception from it cancels
        the job and propagates. ``bundle_path``-free: the caller names the entry.

        Raises:
            ChunkJobError: the child failed or reported something malformed (the copy is
                removed).
        """
        try:
            return self._result(progress)
        except BaseException:
            self.cancel()
            raise
        finally:
            self._reap()

    def _result(self, progress: Callable[[int], None] | None) -> FileEntry:
        out = self._proc.stdout
        assert out is not None
        limit = _REPORT_BASE + _REPORT_PER_CHUNK * (self.size // (256 * 1024) + 1)
        while line := out.readline(_MAX_LINE):
            if line.startswith(b"+"):
                n = line[1:].strip()
                if not n.isdigit() or len(n) > _MAX_DIGITS or int(n) > self.size:
                    raise ChunkJobError(f"chunking {self.source}: bad progress line")
                if progress is not None:
                    progress(int(n))
                continue
            if not line.startswith(b"="):
                raise ChunkJobError(f"chunking {self.source}: unexpected output")
            report = line + out.read(max(0, limit + 1 - len(line)))
            if len(report) > limit:
                raise ChunkJobError(f"chunking {self.source}: report over {limit} bytes")
            status = self._proc.wait()
            if status != 0:
                break
            return _entry(report[1:], self.size, self.source)
        status = self._proc.wait()
        err = self._stderr()
        raise ChunkJobError(f"chunking {self.source} failed (status {status}): {err}")

    def _stderr(self) -> str:
        if self._drain is not None:
            self._drain.join()  # the child has exited: its stderr is at its end
        text = bytes(self._err).decode(errors="replace")
        return " ".join(text.split())[-300:] or "no message"

    def cancel(self) -> None:
        """Stop the child (if running) and remove the copy. Idempotent."""
        with self._lock:
            if self._proc.poll() is None:
                self._proc.kill()
            self._reap()
            self.copy.unlink(missing_ok=True)

    def _reap(self) -> None:
        if self._done:
            return
        self._proc.wait()
        if self._drain is not None:
            self._drain.join()
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
        self._done = True
        atexit.unregister(self.cancel)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells a file apart from one put in its place with the same size and times: the
    inode and the status-change time cannot be set back (``os.utime`` sets only mtime/atime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _entry(doc: bytes, size: int, source: Path) -> FileEntry:
    """The child's report as a checked entry (its path is filled in by the caller)."""
    from ota.repository._chunker import MAX_CHUNK

    try:
        report = json.loads(doc)
        digest, total, pairs = report["sha256"], report["size"], report["chunks"]
        chunks = tuple(Chunk(str(d), int(n)) for d, n in pairs)
    except (ValueError, KeyError, TypeError, ArithmeticError, RecursionError) as e:
        # ArithmeticError: int(Infinity); RecursionError: a deeply nested document
        raise ChunkJobError(f"chunking {source}: malformed report ({e})") from e
    if not (isinstance(digest, str) and _HEX64.fullmatch(digest)) or total != size:
        raise ChunkJobError(f"chunking {source}: the report does not describe the file")
    if not chunks or sum(c.size for c in chunks) != size:
        raise ChunkJobError(f"chunking {source}: chunks do not add up to {size} bytes")
    for c in chunks:
        if not _HEX64.fullmatch(c.sha256) or not 0 < c.size <= MAX_CHUNK:
            raise ChunkJobError(f"chunking {source}: malformed chunk in the report")
    return FileEntry("", digest, size, chunks)


# --- started early by the CLI, adopted by the publish ---------------------------------------

_early: dict[tuple[Path, Path], ChunkJob] = {}


def prestart(source: Path, blob_folder: Path) -> None:
    """Start chunking ``source`` into a new temp copy in ``blob_folder`` (a local repository's
    blob folder) for a publish about to run in this process: :func:`take` hands it over.
    Best effort: any problem just means no job is started (the publish then does its own)."""
    from ota.repository._chunker import MAX_CHUNK
    from ota.repository._fileblob import new_copy_path

    try:
        source = source.resolve()
        if not source.is_file() or source.stat().st_size <= MAX_CHUNK:
            return
        key = (source, blob_folder.resolve())
        copy = new_copy_path(blob_folder)
    except OSError:
        return
    try:
        _early[key] = ChunkJob.start(source, copy)
    except OSError:  # no child (an embedded interpreter, say): its copy is not left behind
        copy.unlink(missing_ok=True)


def take(source: Path, blob_folder: Path) -> ChunkJob | None:
    """The job :func:`prestart` started for ``source`` into ``blob_folder``, if any (it is then
    the caller's, to :meth:`~ChunkJob.result` or :meth:`~ChunkJob.cancel`); any other early
    job is cancelled (it was for another publish). A job whose file is no longer the one it
    started on (another inode, size, modification or status-change time) is cancelled too."""
    key = (source.resolve(), blob_folder.resolve())
    job = _early.pop(key, None)
    for other in list(_early):
        _early.pop(other).cancel()
    if job is not None and (job.identity is None or job.identity != _identity(source.stat())):
        job.cancel()  # replaced or changed since (even with the same size and mtime): start again
        return None
    return job


def cancel_unadopted() -> None:
    """Cancel every job :func:`prestart` started that no publish took (the command is over)."""
    for key in list(_early):
        job = _early.pop(key, None)
        if job is not None:
            job.cancel()


def _main(argv: list[str]) -> int:
    """The child: chunk ``argv[0]`` into the copy ``argv[1]``, report on stdout (see module)."""
    from ota.repository._chunker import chunk_file

    source, copy = Path(argv[0]), Path(argv[1])
    out = sys.stdout.buffer
    pending = 0

    def tick(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= _PROGRESS_EVERY:
            out.write(b"+%d\n" % pending)
            out.flush()
            pending = 0

    try:
        entry = chunk_file(source, "", None, tick, copy, chunk_blobs=False)
        fd = os.open(copy, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        copy.unlink(missing_ok=True)
        sys.stderr.write(f"{e}\n")
        return 1
    if pending:
        out.write(b"+%d\n" % pending)
    report = {
        "sha256": entry.sha256,
        "size": entry.size,
        "chunks": [[c.sha256, c.size] for c in entry.chunks],
    }
    out.write(b"=" + json.dumps(report, separators=(",", ":")).encode() + b"\n")
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
