"""Plan a file's fetch as a few large byte ranges, and judge a server's answer to one (pure).

ADR 0014: the publisher keeps every multi-chunk file also as one content-addressed blob
(``blobs/sha256/<hh>/<file sha256>``; a one-chunk file's chunk blob already is its file
blob). A device that lacks a run of adjacent chunks fetches the run as one ``Range`` of that
blob instead of one request per chunk. Nothing here does IO or decides trust in bytes: the
file's sha256 (named by the TUF-verified manifest and by the model signature) is what
verifies every byte of a span, once, as the file is written.

Invariants:

* :func:`plan` covers the file exactly: its pieces are in order, adjacent, and their sizes sum
  to the file's size; a span is made only of chunks the device lacks, never longer than
  ``max_span`` unless it is a single chunk (chunks are bounded by ``Limits.max_chunk_size``);
* :func:`check_partial` accepts a response only if it is exactly the asked range of a blob of
  exactly the manifest's size: status 206, ``Content-Range: bytes <start>-<end>/<size>`` equal
  to the request, and a ``Content-Length`` (if any) equal to the range's length.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ota.bundle import Chunk, FileEntry
from ota.errors import SecurityError

_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")


@dataclass(frozen=True)
class Piece:
    """Bytes ``[offset, offset + size)`` of a file: a chunk the device may hold (``local``),
    or a run of adjacent chunks it lacks (a span, fetched as one range)."""

    offset: int
    size: int
    chunks: tuple[Chunk, ...]
    local: bool


def plan(entry: FileEntry, have: Callable[[str], bool], max_span: int) -> list[Piece]:
    """Split ``entry`` into local chunks and spans of missing adjacent chunks."""
    pieces: list[Piece] = []
    run: list[Chunk] = []
    run_start = run_size = offset = 0

    def close_run() -> None:
        nonlocal run, run_size
        if run:
            pieces.append(Piece(run_start, run_size, tuple(run), local=False))
        run, run_size = [], 0

    for c in entry.chunks:
        if have(c.sha256):
            close_run()
            pieces.append(Piece(offset, c.size, (c,), local=True))
        else:
            if run and run_size + c.size > max_span:
                close_run()
            if not run:
                run_start = offset
            run.append(c)
            run_size += c.size
        offset += c.size
    close_run()
    return pieces


def range_header(start: int, size: int) -> str:
    """The ``Range`` header asking bytes ``[start, start + size)`` (``size`` > 0)."""
    return f"bytes={start}-{start + size - 1}"


def parse_content_range(value: str) -> tuple[int, int, int] | None:
    """``(first, last, total)`` of a ``bytes first-last/total`` header, or None if malformed
    (an unknown total ``*`` is malformed here: the blob's size must be the manifest's)."""
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if m is None:
        return None
    first, last, total = (int(g) for g in m.groups())
    if first > last or last >= total:
        return None
    return first, last, total


def check_partial(
    url: str,
    content_range: str | None,
    content_length: str | None,
    start: int,
    size: int,
    total: int,
) -> None:
    """Accept a 206 answer to ``range_header(start, size)`` on a blob of ``total`` bytes.

    Raises:
        SecurityError: the answer names other bytes (another start, end or total size), has
            no or a malformed ``Content-Range``, or announces another length: the blob is not
            the file the verified manifest names, or something rewrote the range.
    """
    got = parse_content_range(content_range or "")
    want = (start, start + size - 1, total)
    if got != want:
        raise SecurityError(
            f"{url}: Content-Range {content_range!r} is not the bytes asked "
            f"({want[0]}-{want[1]}/{want[2]})"
        )
    if content_length is not None and content_length.strip() != str(size):
        raise SecurityError(f"{url}: Content-Length {content_length!r} for a range of {size}")
