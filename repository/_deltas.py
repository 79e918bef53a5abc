"""Binary deltas computed by the publisher (ADR 0012).

For every payload file of a new release (the model and its external data), and each of the
model's ``releases`` most recent earlier releases holding a different file at the same bundle
path, the publisher rebuilds the old file from its verified chunks and computes candidates:

* ``zstd-patch-from``: a zstd frame of the new file with the old one as raw prefix and
  long-distance matching: what ``zstd --patch-from`` does, through the pinned zstd binding
  (``backports.zstd``; the standard library's ``compression.zstd`` from Python 3.14);
* ``sub-xz``, when both files have the same length (the layout, tensor offsets included, is
  then almost always unchanged): the new file minus the old one byte by byte (modulo 256),
  compressed as an .xz stream by the standard library's ``lzma`` (liblzma), block by block.

The smallest candidate, checked to decode to the new file, is stored as a content-addressed
blob and listed with its codec in the new release's TUF target
(``ota.client._patch.DELTAS_KEY``), signed with the rest of the target by the bins role; the
device re-checks everything (``client/_patch.py``).

Invariants:

* a delta is recorded only if it decodes (here, before upload) to exactly the new file, and is
  smaller than it;
* old files are read only through chunks whose sha256 the old manifest names; any failure
  (missing blob, over the size bound, out of memory) skips that delta, never the publish;
* files over ``max_file_bytes`` get no delta: the publisher holds the old and the new file in
  memory while it compresses (plus zstd's tables), see ADR 0012 for the figures.
"""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ota.bundle import FileEntry, Manifest, ModelIndex, blob_key
from ota.client._patch import CODEC, SUB_XZ, DeltaEntry, _zstd, add_block, sub_block
from ota.repository._chunker import Uploader

DEFAULT_RELEASES = 2
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class DeltaSettings:
    """How the publisher computes deltas.

    ``releases``: how many of the model's most recent releases serve as bases (0: none).
    ``max_file_bytes``: larger files get no delta; nor do files under ``min_file_bytes`` (one
    average chunk: a delta could save at most that, for one more request and a decode).
    ``fast_level`` is always tried, and ``sub-xz`` when the two files have the same length;
    when the smallest of those is between ``slow_band`` of the file (changes spread through
    the file, where zstd's optimal parser finds the short matches between them),
    ``slow_level`` is tried too (when above ``fast_level``) and the smallest frame kept.
    Outside the band the slow level gains little (measured in ``bench/README.md``) at 20-50x
    the time. ``ota publish`` tries it only with ``--delta-effort max`` (``max_effort``):
    inside the band it takes minutes per file (271 s at 64 MiB), too long for a default
    publish; with ``max_effort`` ``sub-xz`` also searches longer matches (:data:`XZ_MAX`).
    """

    releases: int = DEFAULT_RELEASES
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    min_file_bytes: int = 1024 * 1024
    fast_level: int = 9
    slow_level: int = 19
    slow_band: tuple[float, float] = (0.15, 0.85)
    transform: bool = True

    @property
    def max_effort(self) -> bool:
        return self.slow_level > self.fast_level


# LZMA2 for sub-xz: literal context = the byte's position modulo 4 (lp=2: float lanes), no
# previous-byte context (lc=0); normal (optimal-parse) mode over a hash chain, which finds the
# runs of zeros between changes and their repeats. Measured on 10 % scattered floats (64 MiB,
# bench/README.md): 9.2 % of the file for XZ_DEFAULT, 8.7 % for XZ_MAX at about twice the
# time, 10.4 % for preset 1 (fast mode). The device's decoder is bounded by XZ_MEMLIMIT.
_XZ_COMMON: dict[str, Any] = {
    "id": lzma.FILTER_LZMA2,
    "preset": 1,
    "lc": 0,
    "lp": 2,
    "pb": 2,
    "mode": lzma.MODE_NORMAL,
    "mf": lzma.MF_HC4,
    "depth": 4,
}
XZ_DEFAULT: dict[str, Any] = {**_XZ_COMMON, "nice_len": 64, "dict_size": 1 << 16}
XZ_MAX: dict[str, Any] = {**_XZ_COMMON, "nice_len": 273, "dict_size": 1 << 20}
_BLOCK = 1 << 20


@dataclass
class DeltaStats:
    computed: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0
    # per candidate tried: codec, level or filter, bytes, seconds (chosen: the smallest)
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "computed": self.computed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "bytes": self.bytes,
            "candidates": self.candidates,
        }


def patch_from(base: bytes | bytearray, new: bytes, level: int) -> bytes:
    """One zstd frame of ``new`` with ``base`` as raw prefix (``zstd --patch-from``): window
    covering both, long-distance matching, single worker (zstd's own CLI uses its worker
    pool; with no worker, level 19 loses the long matches: measured, ADR 0012)."""
    zstd = _zstd()
    param = zstd.CompressionParameter
    window = max(len(base), len(new), 1 << 10).bit_length()
    options = {
        param.compression_level: level,
        param.window_log: min(window, 31),
        param.enable_long_distance_matching: 1,
        param.nb_workers: 1,
    }
    cctx = zstd.ZstdCompressor(
        options=options, zstd_dict=zstd.ZstdDict(base, is_raw=True).as_prefix
    )
    out: bytes = cctx.compress(new, zstd.ZstdCompressor.FLUSH_FRAME)
    return out


def sub_xz(base: bytes | bytearray, new: bytes, filters: dict[str, Any]) -> bytes:
    """The ``sub-xz`` delta of ``new`` from ``base`` (``ota.client._patch``): ``new - base``
    byte by byte modulo 256, 1 MiB at a time, into one .xz stream (no CRC: the device checks
    the signed sha256 of the blob and of the result)."""
    comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=[filters])
    nv, bv = memoryview(new), memoryview(base)
    parts = [
        comp.compress(sub_block(nv[i : i + _BLOCK], bv[i : i + _BLOCK]))
        for i in range(0, len(new), _BLOCK)
    ]
    parts.append(comp.flush())
    return b"".join(parts)


def _decodes_to(codec: str, frame: bytes, base: bytes | bytearray, want_sha256: str) -> bool:
    """Whether ``frame`` applied to ``base`` by ``codec`` gives bytes hashing to
    ``want_sha256`` (decoded 1 MiB at a time: the new file is not held twice)."""
    h = hashlib.sha256()
    if codec == SUB_XZ:
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        pos = 0
        data = frame
        while not dec.eof:
            piece = dec.decompress(data, max_length=_BLOCK)
            data = b""
            if not piece and dec.needs_input:
                return False
            h.update(add_block(piece, bytes(base[pos : pos + len(piece)])))
            pos += len(piece)
        return not dec.unused_data and h.hexdigest() == want_sha256
    zstd = _zstd()
    dctx = zstd.ZstdDecompressor(
        zstd.ZstdDict(base, is_raw=True).as_prefix,
        options={zstd.DecompressionParameter.window_log_max: 31},
    )
    data = frame
    while not dctx.eof:
        piece = dctx.decompress(data, max_length=1 << 20)
        data = b""
        if not piece and dctx.needs_input:
            return False
        h.update(piece)
    return h.hexdigest() == want_sha256


def best_delta(
    base: bytes | bytearray,
    new: bytes,
    new_sha256: str,
    settings: DeltaSettings,
    stats: DeltaStats | None = None,
) -> tuple[str, bytes]:
    """The smallest candidate (codec, frame), checked to decode to ``new``: ``sub-xz`` when
    the lengths match (and ``settings.transform``), zstd at ``fast_level``, and zstd at
    ``slow_level`` when the smallest so far is inside ``slow_band`` (see
    :class:`DeltaSettings`). Each candidate's size and time go to ``stats.candidates``.

    Raises:
        ValueError: a frame that does not decode to ``new`` (never expected).
    """
    import time

    found: list[tuple[str, bytes]] = []

    def attempt(codec: str, how: str, make: Any) -> None:
        t0 = time.monotonic()
        frame: bytes = make()
        found.append((codec, frame))
        if stats is not None:
            stats.candidates.append(
                {
                    "codec": codec,
                    "how": how,
                    "bytes": len(frame),
                    "seconds": round(time.monotonic() - t0, 3),
                }
            )

    if settings.transform and len(base) == len(new):
        xz = XZ_MAX if settings.max_effort else XZ_DEFAULT
        attempt(SUB_XZ, f"nice_len={xz['nice_len']}", lambda: sub_xz(base, new, xz))
    attempt(
        CODEC, f"level {settings.fast_level}", lambda: patch_from(base, new, settings.fast_level)
    )
    low, high = settings.slow_band
    smallest = min(len(f) for _, f in found)
    if settings.max_effort and low < smallest / len(new) < high:
        level = settings.slow_level
        attempt(CODEC, f"level {level}", lambda: patch_from(base, new, level))
    codec, frame = min(found, key=lambda cf: len(cf[1]))
    if not _decodes_to(codec, frame, base, new_sha256):
        raise ValueError("the delta does not decode to the new file")
    return codec, frame


def compute(
    store: Any,
    load_manifest: Any,
    index: ModelIndex | None,
    payload: Mapping[str, Path],
    entries: Mapping[str, FileEntry],
    up: Uploader,
    settings: DeltaSettings,
    stats: DeltaStats | None = None,
) -> list[DeltaEntry]:
    """Deltas from the ``settings.releases`` most recent releases of ``index`` to the new
    payload files, uploaded through ``up`` (flushed with the release's chunks).

    ``load_manifest(version)`` returns an earlier release's verified manifest.
    """
    import time

    stats = stats if stats is not None else DeltaStats()
    if index is None or settings.releases <= 0:
        return []
    t0 = time.monotonic()
    recent = sorted(index.releases, key=lambda r: r.counter, reverse=True)[: settings.releases]
    out: list[DeltaEntry] = []
    seen: set[tuple[str, str]] = set()
    for rel in recent:
        try:
            old = load_manifest(rel.version)
        except Exception as e:  # an unreadable old release gives no delta, nothing more
            stats.skipped.append(f"{rel.version}: manifest: {e}"[:200])
            continue
        for path, src in payload.items():
            new = entries[path]
            prev = next((f for f in old.files if f.path == path), None)
            if prev is None or prev.sha256 == new.sha256 or (path, prev.sha256) in seen:
                continue
            seen.add((path, prev.sha256))
            if new.size < settings.min_file_bytes:
                continue
            if max(prev.size, new.size) > settings.max_file_bytes:
                stats.skipped.append(f"{rel.version}:{path}: over {settings.max_file_bytes} B")
                continue
            try:
                base = _rebuild(store, prev)
                codec, frame = best_delta(base, src.read_bytes(), new.sha256, settings, stats)
            except (OSError, MemoryError, ValueError, lzma.LZMAError) as e:
                stats.skipped.append(f"{rel.version}:{path}: {e}"[:200])
                continue
            if len(frame) >= new.size:
                stats.skipped.append(f"{rel.version}:{path}: no smaller than the file")
                continue
            digest = hashlib.sha256(frame).hexdigest()
            up.submit(digest, frame)
            stats.computed += 1
            stats.bytes += len(frame)
            out.append(
                DeltaEntry(
                    path=path,
                    base_version=rel.version,
                    base_sha256=prev.sha256,
                    base_size=prev.size,
                    sha256=digest,
                    size=len(frame),
                    result_sha256=new.sha256,
                    result_size=new.size,
                    codec=codec,
                )
            )
    stats.seconds += time.monotonic() - t0
    return out


def _rebuild(store: Any, f: FileEntry) -> bytearray:
    """An earlier release's file from its stored chunks or file blob, each chunk verified
    against the manifest.

    Raises:
        ValueError: a chunk that is missing or does not match.
    """
    from ota.repository._blobread import iter_chunks, storage_readers

    buf = bytearray(f.size)
    pos = 0
    try:  # chunk blobs, or ranges of the file blob where only it is stored (ADR 0017)
        for c, data in iter_chunks(f, *storage_readers(store)):
            buf[pos : pos + c.size] = data
            pos += c.size
    except Exception as e:
        raise ValueError(f"{f.path} unreadable or not matching its manifest: {e}") from e
    if pos != f.size or hashlib.sha256(buf).hexdigest() != f.sha256:
        raise ValueError(f"{f.path} rebuilt does not match its manifest")
    return buf


def as_manifests(custom: object) -> list[Manifest]:
    """The deltas a target lists, as a manifest whose "chunks" are the delta blobs (for
    ``ota mirror sync``, which copies every chunk a release names, checked against its sha256
    and signed size). None when the list is malformed: devices ignore such a list too."""
    from ota.bundle import Chunk
    from ota.client._patch import deltas_from_target

    try:
        found = deltas_from_target(custom)
    except Exception:
        return []
    files = tuple(FileEntry(d.path, d.sha256, d.size, (Chunk(d.sha256, d.size),)) for d in found)
    return [Manifest("deltas", "0", files)] if files else []


def referenced_blobs(custom: object) -> set[str]:
    """Blob keys of the deltas a target lists (for ``ota gc``); none when malformed."""
    from ota.client._patch import deltas_from_target

    try:
        return {blob_key(d.sha256) for d in deltas_from_target(custom)}
    except Exception:
        return set()
