"""Atomic, durable writes: the one helper every piece of persisted state goes through.

Invariant: after :func:`write_bytes` returns, the file holds exactly ``data`` and survives a
power cut; before it returns, a reader sees the old content or (if there was none) no file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ota.errors import LocalError


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset+length)`` of ``fd`` out, without
    waiting (Linux starts writeback of dirty pages on ``POSIX_FADV_DONTNEED``; pages still
    dirty or under writeback stay cached), so that a later fsync waits only for a tail.
    Advice only: any failure is ignored."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or a new entry in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, *, mode: int = 0o644, exclusive: bool = False) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, ``os.replace``, fsync dir).
    With ``exclusive`` the file is only created, never replaced: the name is claimed with
    ``O_EXCL`` just before the rename (fails if a file of that name exists, however recently it
    appeared; works without hard links, e.g. on a FAT key stick). A crash between the claim
    and the rename leaves an empty file, never a partial one.

    Raises:
        LocalError: the disk is full or the folder cannot be written, or (``exclusive``) the
            file exists. The old file is intact.
    """
    with open_atomic(path, mode=mode, exclusive=exclusive) as f:
        f.write(data)


@contextlib.contextmanager
def open_atomic(path: Path, *, mode: int = 0o644, exclusive: bool = False) -> Iterator[BinaryIO]:
    """Write a file through a temp file in the same folder; publish it atomically on success.

    On any exception the temp file is removed and ``path`` is untouched.

    Raises:
        LocalError: the disk is full or the folder cannot be written.
    """
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise _local(e, path) from e
    try:
        with os.fdopen(fd, "wb") as raw:
            yield raw
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, mode)
        if exclusive:  # EEXIST rather than replace a file created since any check
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            try:
                os.replace(tmp, path)
            except OSError:
                _unlink_quiet(path)  # our own empty claim
                raise
        else:
            os.replace(tmp, path)
        fsync_dir(parent)
    except OSError as e:
        _unlink_quiet(Path(tmp))
        raise _local(e, path) from e
    except BaseException:
        _unlink_quiet(Path(tmp))
        raise


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _local(e: OSError, path: Path) -> LocalError:
    if e.errno == errno.ENOSPC:
        return LocalError(f"disk full while writing {path}", remedy="free disk space and retry")
    if e.errno == errno.EEXIST:
        return LocalError(f"{path} exists already; it was not overwritten")
    return LocalError(f"cannot write {path}: {e.strerror or e}")
