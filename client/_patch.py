"""Binary deltas on the device (ADR 0012): the format the publisher signs, the choice between a
delta and the missing chunks, and a bounded, verified apply.

A release's TUF target may carry, beside its edge-ota facts, a list of deltas under
:data:`DELTAS_KEY` (signed by the bins role with the rest of the target): "this bundle file,
of ``result_size`` bytes hashing to ``result_sha256``, is blob ``sha256`` (``size`` bytes)
applied to the file ``base_sha256`` (``base_size`` bytes, from release ``base_version``) by
``codec``". Codecs (:data:`CODECS`; an entry with another codec is skipped, never refused, so
that a publisher may add one without breaking older devices):

* ``zstd-patch-from``: a zstd frame decompressed with the base as its raw prefix
  (``zstd --patch-from``);
* ``sub-xz``: an .xz stream (LZMA2) of the new file minus the base, byte by byte modulo 256,
  over the base's length (the bytes past it as they are): where the layout of the file is
  unchanged (same length, tensors at the same offsets) unchanged floats give zero bytes, and
  scattered changes short runs of nonzero bytes that LZMA2 codes near their entropy. Applied
  streaming, block by block: memory stays flat whatever the file's size.

Invariants:

* a delta is used only for a file whose result hash and size equal the TUF-verified
  manifest's entry, and only when it costs fewer bytes than the chunks the device lacks;
* the base file is read from a slot of this device, bounded by its announced size, and its
  sha256 is checked *before* anything is decompressed (a base mismatch is refused);
* the delta blob is verified by :class:`~ota.client._fetch.BlobFetcher` (length and sha256)
  before it is decompressed; its frame must announce exactly ``result_size`` bytes;
* the output is bounded by ``result_size``, hashed while written, fsynced, and kept only if
  it hashes to ``result_sha256``; the stager then re-verifies it like any local file;
* memory (per codec, :meth:`DeltaEntry.memory_needed`) is checked against the budget first;
  over it, the delta is skipped;
* any failure only skips the delta: the file is then assembled from verified chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ota.bundle import FileEntry, FormatError, Manifest, Release, validate_bundle_path
from ota.errors import LocalError, OtaError, SecurityError

if TYPE_CHECKING:  # annotations only: the publisher imports this module (ota.repository._deltas)
    # and must not import the device's HTTP stack with it (urllib3, ssl, http.client,
    # python-tuf's ngclient: issue 13)
    from ._fetch import BlobFetcher

DELTAS_KEY = "edge-ota.deltas/1"
CODEC = "zstd-patch-from"
SUB_XZ = "sub-xz"
CODECS = frozenset({CODEC, SUB_XZ})
XZ_MEMLIMIT = 64 * 1024 * 1024  # LZMA2 decoder: dictionary + state; publishers use <= 1 MiB
_XZ_MAGIC = b"\xfd7zXZ\x00"
_CODEC_NAME = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,39}$")
MAX_DELTAS = 64  # entries per target: a few files x a few base releases
MAX_FILE_BYTES = 2**40
OVERHEAD_BYTES = 64 * 1024 * 1024  # zstd's decoder state, Python, buffers: measured ~20 MiB
SCRATCH = "delta.tmp"  # under the model's folder; removed before and after every install
_OUT_STEP = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^[0-9A-Za-z.+_-]{1,128}$")
_ENTRY_KEYS = frozenset(
    {
        "path",
        "codec",
        "base_version",
        "base_sha256",
        "base_size",
        "sha256",
        "size",
        "result_sha256",
        "result_size",
    }
)


class DeltaRefused(SecurityError):
    """A delta that must not be used: tampered, mismatched base, output that differs."""


@dataclass(frozen=True)
class DeltaEntry:
    """One delta of one bundle file, as signed in the release's target."""

    path: str
    base_version: str
    base_sha256: str
    base_size: int
    sha256: str
    size: int
    result_sha256: str
    result_size: int
    codec: str = CODEC

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "codec": self.codec,
            "base_version": self.base_version,
            "base_sha256": self.base_sha256,
            "base_size": self.base_size,
            "sha256": self.sha256,
            "size": self.size,
            "result_sha256": self.result_sha256,
            "result_size": self.result_size,
        }

    @classmethod
    def from_dict(cls, doc: object) -> DeltaEntry:
        if not isinstance(doc, dict) or set(doc) != _ENTRY_KEYS:
            raise FormatError("delta entry: not an object with the expected keys")
        codec = doc["codec"]
        if not isinstance(codec, str) or not _CODEC_NAME.match(codec):
            raise FormatError("delta entry: bad codec name")
        version = doc["base_version"]
        if not isinstance(version, str) or not _VERSION.match(version):
            raise FormatError("delta entry: bad base version")
        return cls(
            path=validate_bundle_path(_str(doc["path"])),
            base_version=version,
            base_sha256=_hex(doc["base_sha256"]),
            base_size=_size(doc["base_size"]),
            sha256=_hex(doc["sha256"]),
            size=_size(doc["size"]),
            result_sha256=_hex(doc["result_sha256"]),
            result_size=_size(doc["result_size"]),
            codec=codec,  # unknown codecs parse; choose_deltas skips them
        )

    def memory_needed(self) -> int:
        """Bytes the apply holds at its peak. ``zstd-patch-from``: the base twice (read, and
        zstd's copy of it as the prefix, for an instant), the delta blob, the decoder's window
        (at most the result: the frame's content size bounds it); measured at 64 MiB: 207 MiB
        over the process's start for 197 MiB counted here without the overhead (ADR 0012).
        ``sub-xz``: the blob, the LZMA2 decoder (bounded by :data:`XZ_MEMLIMIT`) and a few
        blocks: flat in the file's size."""
        if self.codec == SUB_XZ:
            return self.size + XZ_MEMLIMIT + 4 * _OUT_STEP + OVERHEAD_BYTES
        return 2 * self.base_size + self.size + self.result_size + OVERHEAD_BYTES


def deltas_to_custom(entries: Sequence[DeltaEntry]) -> list[dict[str, Any]]:
    return [e.to_dict() for e in entries]


def deltas_from_target(custom: object) -> tuple[DeltaEntry, ...]:
    """The deltas a TUF target's custom data lists (none if it lists none).

    Raises:
        FormatError: a list that is malformed or longer than :data:`MAX_DELTAS`.
    """
    if not isinstance(custom, Mapping) or DELTAS_KEY not in custom:
        return ()
    doc = custom[DELTAS_KEY]
    if not isinstance(doc, list) or len(doc) > MAX_DELTAS:
        raise FormatError("deltas: not a list of at most 64 entries")
    return tuple(DeltaEntry.from_dict(d) for d in doc)


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise FormatError("delta entry: expected a string")
    return v


def _hex(v: object) -> str:
    if not isinstance(v, str) or not _HEX64.match(v):
        raise FormatError("delta entry: bad sha256")
    return v


def _size(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_FILE_BYTES:
        raise FormatError("delta entry: bad size")
    return v


def memory_budget(rel: Release, tier: str) -> int:
    """Bytes a delta may hold while it is applied: the tier's memory budget when the release
    sets one (the device's application and smoke run within it, so the updater may use as
    much before smoke runs), else half of the physical memory."""
    budget = rel.smoke.budget_for(tier) if rel.smoke is not None else None
    if budget is not None and budget.peak_mem_mb is not None:
        return int(budget.peak_mem_mb * 1024 * 1024)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 512 * 1024 * 1024


# -- choice ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """A slot of this device: its folder and the manifest it was installed from."""

    root: Path
    manifest: Manifest


@dataclass
class PatchReport:
    """What the delta path did for one install (figures, events)."""

    applied: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)  # security: see DeltaRefused

    @property
    def delta_bytes(self) -> int:
        return sum(int(a["delta_bytes"]) for a in self.applied)

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "skipped": self.skipped,
            "refused": self.refused,
            "delta_bytes": self.delta_bytes,
        }


def missing_chunk_bytes(f: FileEntry, local: Iterable[Local]) -> int:
    """Bytes of ``f`` the chunk path would download: chunks no local slot's manifest names
    (0 when the whole file is in a slot)."""
    have: set[str] = set()
    for lo in local:
        if any(x.sha256 == f.sha256 for x in lo.manifest.files):
            return 0
        have |= lo.manifest.chunk_digests()
    return sum(c.size for c in f.chunks if c.sha256 not in have)


def choose_deltas(
    manifest: Manifest,
    deltas: Sequence[DeltaEntry],
    local: Sequence[Local],
    budget: int,
    report: PatchReport,
) -> list[tuple[DeltaEntry, Path, int]]:
    """Per file, the cheapest delta from a base this device holds, if it costs fewer bytes
    than the missing chunks and fits ``budget``: (entry, base file, chunk bytes avoided)."""
    chosen = []
    for f in manifest.files:
        options = [d for d in deltas if d.path == f.path]
        if not options:
            continue
        chunk_cost = missing_chunk_bytes(f, local)
        best: tuple[DeltaEntry, Path] | None = None
        for d in sorted(options, key=lambda d: d.size):
            why = _unusable(d, f, chunk_cost, budget)
            base = _base_file(d, local)
            if why is None and base is None:
                why = "no slot of this device holds its base"
            if why is not None:
                report.skipped.append(
                    {"path": f.path, "base_version": d.base_version, "reason": why}
                )
                continue
            assert base is not None
            best = (d, base)
            break
        if best is not None:
            chosen.append((best[0], best[1], chunk_cost))
    return chosen


def _unusable(d: DeltaEntry, f: FileEntry, chunk_cost: int, budget: int) -> str | None:
    if d.codec not in CODECS:
        return f"unknown codec {d.codec!r}"
    if (d.result_sha256, d.result_size) != (f.sha256, f.size):
        return "its result is not the manifest's file"
    if d.size >= f.size:
        return f"oversize: {d.size} bytes for a file of {f.size}"
    if d.size >= chunk_cost:
        return f"the missing chunks cost less ({chunk_cost} <= {d.size} bytes)"
    if d.memory_needed() > budget:
        return f"needs {d.memory_needed()} bytes of memory, over the budget of {budget}"
    return None


def _base_file(d: DeltaEntry, local: Sequence[Local]) -> Path | None:
    for lo in local:
        for x in lo.manifest.files:
            if x.path == d.path and (x.sha256, x.size) == (d.base_sha256, d.base_size):
                return lo.root / x.path
    return None


# -- apply ----------------------------------------------------------------------------------


def apply_deltas(
    chosen: Sequence[tuple[DeltaEntry, Path, int]],
    scratch: Path,
    fetcher: BlobFetcher,
    report: PatchReport,
    on_refused: Callable[[DeltaEntry, str], None] | None = None,
) -> list[FileEntry]:
    """Apply each chosen delta into ``scratch`` (recreated), keeping only verified results.
    Returns the manifest entries now present under ``scratch`` (for a
    :class:`~ota.client._chunks.ChunkIndex`). A failure skips that delta (the chunks are
    used instead); a refusal for a security reason is also passed to ``on_refused``."""
    shutil.rmtree(scratch, ignore_errors=True)
    done: list[FileEntry] = []
    for d, base, avoided in chosen:
        out = scratch / d.path
        try:
            free = shutil.disk_usage(scratch.parent).free
            if free < d.result_size + 16 * 1024 * 1024:
                raise LocalError(f"not enough disk for the patched file ({free} bytes free)")
            out.parent.mkdir(parents=True, exist_ok=True)
            apply_one(d, base, out, fetcher)
        except (OtaError, OSError, MemoryError, ValueError, ImportError) as e:
            # ImportError: a device installed without the zstd binding uses the chunks
            _remove(out)
            rec = {"path": d.path, "base_version": d.base_version, "reason": str(e)[:300]}
            if isinstance(e, SecurityError):
                report.refused.append(rec)
                if on_refused is not None:
                    on_refused(d, str(e))
            else:
                report.skipped.append(rec)
            continue
        report.applied.append(
            {
                "path": d.path,
                "base_version": d.base_version,
                "codec": d.codec,
                "delta_bytes": d.size,
                "chunk_bytes_avoided": avoided,
            }
        )
        done.append(FileEntry(d.path, d.result_sha256, d.result_size, ()))
    return done


def apply_one(d: DeltaEntry, base_path: Path, out: Path, fetcher: BlobFetcher) -> None:
    """Write the file ``d`` describes to ``out``, verified (module invariants).

    Raises:
        DeltaRefused: the base differs from ``d.base_sha256``, the blob is not of its codec or
            does not decode, announces another size, the output exceeds or differs from the
            result.
        SecurityError: the delta blob fails verification (from the fetcher).
        TransientError: the network failed.
        LocalError: a codec this device does not know.
        OSError, MemoryError: local failures.
    """
    if d.codec == CODEC:
        pieces = _zstd_pieces(d, base_path, fetcher)
    elif d.codec == SUB_XZ:
        pieces = _sub_xz_pieces(d, base_path, fetcher)
    else:
        raise LocalError(f"unknown delta codec {d.codec!r}")
    _write_verified(d, out, pieces)


def _base_refused(d: DeltaEntry) -> DeltaRefused:
    return DeltaRefused(
        f"the base of the delta for {d.path} differs from {d.base_version}'s file on this device"
    )


def _zstd_pieces(d: DeltaEntry, base_path: Path, fetcher: BlobFetcher) -> Iterator[bytes]:
    """The decoded output of a ``zstd-patch-from`` delta, 1 MiB at a time (the base is read
    and checked, and the blob fetched and checked, before the first piece)."""
    zstd = _zstd()
    with base_path.open("rb") as fh:
        base = fh.read(d.base_size + 1)
    if len(base) != d.base_size or hashlib.sha256(base).hexdigest() != d.base_sha256:
        raise _base_refused(d)
    blob = bytes(fetcher.fetch(d.sha256, d.size))  # length and sha256 verified
    try:
        info = zstd.get_frame_info(blob)
    except zstd.ZstdError as e:
        raise DeltaRefused(f"the delta for {d.path} is not a zstd frame: {e}") from e
    if info.decompressed_size != d.result_size:
        raise DeltaRefused(
            f"the delta for {d.path} announces {info.decompressed_size} bytes, not {d.result_size}"
        )
    prefix = zstd.ZstdDict(base, is_raw=True)
    del base  # the dictionary holds its own copy
    dctx = zstd.ZstdDecompressor(
        prefix.as_prefix, options={zstd.DecompressionParameter.window_log_max: 31}
    )
    return _zstd_decode(d, dctx, blob)


def _zstd_decode(d: DeltaEntry, dctx: Any, blob: bytes) -> Iterator[bytes]:
    zstd = _zstd()
    data: bytes = blob
    while not dctx.eof:
        try:
            piece: bytes = dctx.decompress(data, max_length=_OUT_STEP)
        except zstd.ZstdError as e:
            raise DeltaRefused(f"the delta for {d.path} does not decode: {e}") from e
        data = b""
        if not piece and dctx.needs_input:
            raise DeltaRefused(f"the delta for {d.path} is truncated")
        yield piece
    if dctx.unused_data:
        raise DeltaRefused(f"the delta for {d.path} has data after its frame")


def _sub_xz_pieces(d: DeltaEntry, base_path: Path, fetcher: BlobFetcher) -> Iterator[bytes]:
    """The decoded output of a ``sub-xz`` delta, block by block: the base is hashed first
    (streamed, bounded by ``base_size``), the blob fetched and checked, then each decoded
    block is added to the base's bytes at the same offset (modulo 256)."""
    h = hashlib.sha256()
    seen = 0
    with base_path.open("rb") as fh:
        while block := fh.read(min(_OUT_STEP, d.base_size + 1 - seen)):
            seen += len(block)
            h.update(block)
            if seen > d.base_size:
                break
    if seen != d.base_size or h.hexdigest() != d.base_sha256:
        raise _base_refused(d)
    blob = bytes(fetcher.fetch(d.sha256, d.size))  # length and sha256 verified
    if not blob.startswith(_XZ_MAGIC):
        raise DeltaRefused(f"the delta for {d.path} is not an xz stream")
    return _sub_xz_decode(d, base_path, blob)


def _sub_xz_decode(d: DeltaEntry, base_path: Path, blob: bytes) -> Iterator[bytes]:
    import lzma  # the standard library's, when Python was built with it (else: chunks)

    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
    data = blob
    with base_path.open("rb") as fh:
        while not dec.eof:
            try:
                piece = dec.decompress(data, max_length=_OUT_STEP)
            except lzma.LZMAError as e:
                raise DeltaRefused(f"the delta for {d.path} does not decode: {e}") from e
            data = b""
            if not piece and dec.needs_input:
                raise DeltaRefused(f"the delta for {d.path} is truncated")
            yield add_block(piece, fh.read(len(piece)))
    if dec.unused_data:
        raise DeltaRefused(f"the delta for {d.path} has data after its stream")


def sub_block(new: bytes | memoryview, base: bytes | memoryview) -> bytes:
    """``sub-xz``'s transform of one block: ``new - base`` byte by byte modulo 256 over
    ``base``'s length (which may be shorter at the base's end), ``new``'s bytes past it."""
    import numpy as np

    k = min(len(new), len(base))
    out = np.frombuffer(new, np.uint8).copy()
    out[:k] -= np.frombuffer(base, np.uint8, count=k)
    return out.tobytes()


def add_block(delta: bytes, base: bytes) -> bytes:
    """The inverse of :func:`sub_block`: ``delta + base`` modulo 256 over ``base``'s length."""
    import numpy as np

    k = min(len(delta), len(base))
    out = np.frombuffer(delta, np.uint8).copy()
    out[:k] += np.frombuffer(base, np.uint8, count=k)
    return out.tobytes()


def _write_verified(d: DeltaEntry, out: Path, pieces: Iterator[bytes]) -> None:
    """Write ``pieces`` to ``out`` through a temporary file: bounded by ``d.result_size``,
    hashed while written, fsynced, and renamed only if size and sha256 are the result's."""
    h = hashlib.sha256()
    written = 0
    tmp = out.with_name(f".{out.name}.part")
    try:
        with tmp.open("wb") as w:
            for piece in pieces:
                written += len(piece)
                if written > d.result_size:
                    raise DeltaRefused(
                        f"the delta for {d.path} decodes to more than {d.result_size} bytes"
                    )
                h.update(piece)
                w.write(piece)
            if written != d.result_size or h.hexdigest() != d.result_sha256:
                raise DeltaRefused(
                    f"the delta for {d.path} decodes to another file than the manifest's"
                )
            w.flush()
            os.fsync(w.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, out)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _zstd() -> Any:
    """The zstd binding: the standard library's ``compression.zstd`` from Python 3.14, its
    backport (``backports.zstd``, pinned) before."""
    if sys.version_info >= (3, 14):
        from compression import zstd
    else:
        from backports import zstd
    return zstd


# -- the updater's hook -------------------------------------------------------------------


def try_deltas(
    dev: Any,
    name: str,
    rel: Release,
    custom: object,
    manifest: Manifest,
    fetcher: BlobFetcher,
    index: Any,
) -> PatchReport:
    """The delta path of one install (``ota.client._install``): choose, apply, and make every
    verified result available to the stager through ``index`` (a ChunkIndex: the stager
    links it after re-hashing). Bases come from either slot of the model. Never raises for a
    delta: the chunks remain."""
    from . import _slots

    mdir = dev.mdir(name)
    local = []
    for s in _slots.SLOTS:
        m = _slots.read_manifest(mdir, s)
        if m is not None:
            local.append(Local(_slots.slot_path(mdir, s), m))
    report = PatchReport()
    scratch = dev.mdir(name) / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        deltas = deltas_from_target(custom)
    except FormatError as e:
        report.refused.append({"path": "*", "base_version": "", "reason": str(e)[:300]})
        dev.events.append("security", name, rel.version, reason=f"delta list refused: {e}")
        return report
    if not deltas or not local:
        return report
    chosen = choose_deltas(manifest, deltas, local, memory_budget(rel, dev.cfg.tier), report)
    if not chosen:
        return report

    def refused(d: DeltaEntry, why: str) -> None:
        dev.events.append(
            "security",
            name,
            rel.version,
            reason=f"delta from {d.base_version} refused: {why}"[:500],
        )

    done = apply_deltas(chosen, scratch, fetcher, report, refused)
    if done:
        index.add_tree(scratch, Manifest(manifest.name, manifest.version, tuple(done)))
    return report
