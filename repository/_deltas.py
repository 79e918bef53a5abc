"""Binary deltas computed by the publisher (ADR 0012).

For every payload file of a new release (the model and its external data), and each of the
model's ``releases`` most recent earlier releases holding a different file at the same bundle
path, the publisher rebuilds the old file from its verified chunks and computes a zstd frame of
the new file with the old one as raw prefix and long-distance matching: what
``zstd --patch-from`` does, through the pinned zstd binding (``backports.zstd``; the standard
library's ``compression.zstd`` from Python 3.14). The frame is stored as a content-addressed
blob and listed in the new release's TUF target (``ota.client._patch.DELTAS_KEY``), signed with
the rest of the target by the bins role; the device re-checks everything (``client/_patch.py``).

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ota.bundle import FileEntry, Manifest, ModelIndex, blob_key
from ota.client._patch import DeltaEntry, _zstd
from ota.repository._chunker import Uploader

DEFAULT_RELEASES = 2
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class DeltaSettings:
    """How the publisher computes deltas.

    ``releases``: how many of the model's most recent releases serve as bases (0: none).
    ``max_file_bytes``: larger files get no delta; nor do files under ``min_file_bytes`` (one
    average chunk: a delta could save at most that, for one more request and a decode).
    ``fast_level`` is always tried; when its
    delta is between ``slow_band`` of the file (changes spread through the file, where
    zstd's optimal parser finds the short matches between them), ``slow_level`` is tried too
    (when above ``fast_level``) and the smaller frame kept. Outside the band the slow level
    gains little (measured in ``bench/README.md``) at 20-50x the time. ``ota publish`` tries
    it only with ``--delta-effort max``: inside the band it takes minutes per file (271 s at
    64 MiB), too long for a default publish.
    """

    releases: int = DEFAULT_RELEASES
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    min_file_bytes: int = 1024 * 1024
    fast_level: int = 9
    slow_level: int = 19
    slow_band: tuple[float, float] = (0.15, 0.85)


@dataclass
class DeltaStats:
    computed: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "computed": self.computed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "bytes": self.bytes,
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


def _decodes_to(frame: bytes, base: bytes | bytearray, want_sha256: str) -> bool:
    """Whether ``frame`` decodes, with ``base`` as prefix, to bytes hashing to
    ``want_sha256`` (decoded 1 MiB at a time: the new file is not held twice)."""
    zstd = _zstd()
    dctx = zstd.ZstdDecompressor(
        zstd.ZstdDict(base, is_raw=True).as_prefix,
        options={zstd.DecompressionParameter.window_log_max: 31},
    )
    h = hashlib.sha256()
    data = frame
    while not dctx.eof:
        piece = dctx.decompress(data, max_length=1 << 20)
        data = b""
        if not piece and dctx.needs_input:
            return False
        h.update(piece)
    return h.hexdigest() == want_sha256


def best_delta(
    base: bytes | bytearray, new: bytes, new_sha256: str, settings: DeltaSettings
) -> bytes:
    """The smaller of the fast and (when worth it, see :class:`DeltaSettings`) slow frames,
    checked to decode to ``new``.

    Raises:
        ValueError: a frame that does not decode to ``new`` (never expected).
    """
    frame = patch_from(base, new, settings.fast_level)
    low, high = settings.slow_band
    if settings.slow_level > settings.fast_level and low < len(frame) / len(new) < high:
        slow = patch_from(base, new, settings.slow_level)
        frame = min(frame, slow, key=len)
    if not _decodes_to(frame, base, new_sha256):
        raise ValueError("the delta does not decode to the new file")
    return frame


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
                frame = best_delta(base, src.read_bytes(), new.sha256, settings)
            except (OSError, MemoryError, ValueError) as e:
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
                )
            )
    stats.seconds += time.monotonic() - t0
    return out


def _rebuild(store: Any, f: FileEntry) -> bytearray:
    """An earlier release's file from its stored chunks, each verified against the manifest.

    Raises:
        ValueError: a chunk that is missing or does not match.
    """
    buf = bytearray(f.size)
    pos = 0
    for c in f.chunks:
        try:
            data, _ = store.get(blob_key(c.sha256), max_bytes=c.size)
        except Exception as e:
            raise ValueError(f"chunk {c.sha256[:16]} unreadable: {e}") from e
        if len(data) != c.size or hashlib.sha256(data).hexdigest() != c.sha256:
            raise ValueError(f"chunk {c.sha256[:16]} does not match its manifest")
        buf[pos : pos + c.size] = data
        pos += c.size
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
