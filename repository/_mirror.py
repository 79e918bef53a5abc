"""``ota mirror sync SOURCE DEST``: a verified, resumable, never-backwards site mirror.

A site mirror is a copy of a published repository (a folder, or an S3 bucket through
:func:`open_storage`) that devices on the site read with no change but their URL.

Trust: every metadata decision is python-tuf's. One ``ngclient.Updater`` session
(:class:`~ota.repository._tufview.TufView`) in a private work folder, bootstrapped with the
operator's trusted root, walks the root chain, timestamp, snapshot and targets, then every
delegated role (``Updater._load_targets``, python-tuf's own loader). What is copied as metadata
is exactly the bytes python-tuf verified and persisted. Targets are downloaded through the
same updater (length and hashes checked by python-tuf); chunks are checked against their content
address (the sha256 in their key) and the size the verified manifest gives.

Invariants:

* Order: chunks, then targets, a storage barrier, then versioned metadata (delegated roles,
  targets, snapshot), then new root versions, then ``metadata/timestamp.json`` last. A device
  reading the mirror mid-sync sees the previous head, whose every byte is still there.
* Nothing reaches the mirror before the whole metadata walk and every target verified; a chunk
  is written only once verified, atomically (temp file then rename, or one S3 PUT), so a name
  never holds partial bytes. A re-run skips what is already there: chunks by name (written
  only after verification), targets after re-checking their TUF length and hashes.
* Never backwards: a source whose timestamp, snapshot or root version is older than the
  mirror's is refused (:class:`MirrorRollback`, exit 4) before anything is written. python-tuf
  also sees the mirror's timestamp as its trusted local copy, so it applies its own rollback
  checks.
* Bounded: metadata by ``updater_config()``'s lengths, targets by their signed length (and
  :data:`MAX_TARGET_BYTES`), chunks by the manifest's sizes; HTTP reads have timeouts.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets, Timestamp

from ota.bundle import FileEntry, Manifest, blob_key
from ota.errors import OtaError, SecurityError, TransientError
from ota.repository import _deltas  # issue 13: delta blobs are mirrored too
from ota.repository._storage import NotFound, Storage, open_storage
from ota.repository._tufview import HttpSource, Source, StorageSource, TufView

MAX_TARGET_BYTES = 64 * 1024 * 1024
MAX_ROLES = 4096
_ROOT_RE = re.compile(r"^metadata/([1-9][0-9]{0,8})\.root\.json$")

Progress = Callable[[str, str], None]
"""Called after each object is written to the mirror, with its kind and key (a test hook
and a progress display; never called for objects skipped)."""


class MirrorRollback(SecurityError):
    """The source is older than what the mirror already serves: refused, mirror unchanged."""

    remedy = "sync from an up-to-date source; the mirror never goes backwards"


class MirrorRefused(SecurityError):
    """The source failed verification: nothing it served was trusted; the mirror is unchanged."""

    remedy = "inspect the source (ota audit); the mirror still serves its previous state"


@dataclass
class SyncResult:
    source: str
    dest: str
    timestamp_version: int = 0
    snapshot_version: int = 0
    root_version: int = 0
    copied: dict[str, int] = field(default_factory=lambda: {"blobs": 0, "targets": 0,
                                                            "metadata": 0})  # fmt: skip
    skipped: dict[str, int] = field(default_factory=lambda: {"blobs": 0, "targets": 0,
                                                             "metadata": 0})  # fmt: skip
    bytes_copied: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dest": self.dest,
            "timestamp_version": self.timestamp_version,
            "snapshot_version": self.snapshot_version,
            "root_version": self.root_version,
            "copied": dict(self.copied),
            "skipped": dict(self.skipped),
            "bytes_copied": self.bytes_copied,
        }


def open_source(url: str, *, timeout: float = 30.0) -> Source:
    """A repository served over HTTP(S), or a storage URL / folder."""
    if urlparse(url).scheme in ("http", "https"):
        return HttpSource(url, timeout=timeout)
    return StorageSource(open_storage(url))


def sync(
    source: Source, dest: Storage, trusted_root: bytes, *, on_write: Progress | None = None
) -> SyncResult:
    """Bring ``dest`` to the source's verified state (see the module's invariants).

    Raises:
        MirrorRefused: python-tuf refused the source's metadata, or a target or chunk differs
            from what the verified metadata says (exit 4).
        MirrorRollback: the source is older than the mirror (exit 4).
        TransientError: the source is unreachable (exit 5). StorageError / LocalError: the
            mirror cannot be written.
    """
    result = SyncResult(source.label, dest.url)
    with tempfile.TemporaryDirectory(prefix="ota-mirror-") as tmp:
        work = Path(tmp)
        held = _mirror_head(dest)
        if held.timestamp is not None:  # python-tuf's own rollback checks against the mirror
            (work / "metadata").mkdir(parents=True)
            (work / "metadata" / "timestamp.json").write_bytes(held.timestamp)
        view = _verified_view(source, trusted_root, work)
        state = _collect(view, trusted_root)
        _check_not_older(held, state)
        result.timestamp_version = state.timestamp_version
        result.snapshot_version = state.snapshot_version
        result.root_version = state.root_version
        targets, manifests = _download_targets(view, dest, state.targets, result)
        _copy_blobs(source, dest, manifests, result, on_write)
        for key, staged in targets.items():
            _write(dest, key, staged.read_bytes(), "targets", result, on_write)
        dest.barrier()
        for key, data in state.metadata:
            _put_if_changed(dest, key, data, result, on_write)
        dest.barrier()
    return result


# -- the mirror's current head ---------------------------------------------------------------


@dataclass
class _Head:
    timestamp: bytes | None = None
    timestamp_version: int = 0
    snapshot_version: int = 0
    root_version: int = 0


def _mirror_head(dest: Storage) -> _Head:
    """Versions the mirror serves now (its own earlier, verified copy)."""
    head = _Head()
    for key in dest.list("metadata/"):
        m = _ROOT_RE.match(key)
        if m:
            head.root_version = max(head.root_version, int(m.group(1)))
    try:
        data = dest.get("metadata/timestamp.json", max_bytes=16_384)[0]
    except NotFound:
        return head
    try:
        md = Metadata[Timestamp].from_bytes(data)
        if not isinstance(md.signed, Timestamp):
            raise ValueError("not a timestamp")
    except (ValueError, tuf_exc.RepositoryError) as e:
        raise MirrorRefused(
            f"the mirror's own metadata/timestamp.json is unreadable: {e}",
            remedy="inspect the mirror; remove its metadata/timestamp.json only if it is corrupt",
        ) from e
    head.timestamp = data
    head.timestamp_version = md.signed.version
    head.snapshot_version = md.signed.snapshot_meta.version
    return head


def _check_not_older(held: _Head, state: _State) -> None:
    for what, have, got in (
        ("timestamp", held.timestamp_version, state.timestamp_version),
        ("snapshot", held.snapshot_version, state.snapshot_version),
        ("root", held.root_version, state.root_version),
    ):
        if got < have:
            raise MirrorRollback(
                f"the source's {what} is version {got}, older than the mirror's {have}"
            )


# -- the python-tuf walk ----------------------------------------------------------------------


@dataclass
class _State:
    timestamp_version: int
    snapshot_version: int
    root_version: int
    metadata: list[tuple[str, bytes]]  # in write order, timestamp last
    targets: list[TargetFile]


def _verified_view(source: Source, trusted_root: bytes, work: Path) -> TufView:
    view: TufView | None = None
    try:
        view = TufView(source, trusted_root, work)
        view.updater.refresh()
        return view
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError, ValueError) as e:
        raise _refusal(e, view) from e


def _refusal(e: Exception, view: TufView | None) -> OtaError:
    where = f" (reading {view.fetcher.last})" if view and view.fetcher.last else ""
    if isinstance(e, tuf_exc.BadVersionNumberError):
        return MirrorRollback(f"python-tuf refused a rollback{where}: {e}")
    cause = e.__cause__
    if isinstance(cause, OtaError) and not isinstance(cause, NotFound):
        return cause  # unreachable source (5), an oversized object (4), ...
    if isinstance(e, tuf_exc.DownloadError) and not isinstance(
        e, tuf_exc.DownloadLengthMismatchError | tuf_exc.DownloadHTTPError
    ):
        return TransientError(f"cannot read the source{where}: {e}")
    return MirrorRefused(f"python-tuf refused the source{where}: {type(e).__name__}: {e}")


def _collect(view: TufView, trusted_root: bytes) -> _State:
    """Load every delegated role through python-tuf; return what to copy, in order."""
    mdir = view.mdir

    def verified(role: str) -> tuple[bytes, Metadata[Any]]:
        data = (mdir / f"{quote(role, '')}.json").read_bytes()
        return data, Metadata.from_bytes(data)

    targets: list[TargetFile] = []
    delegated: list[tuple[str, bytes]] = []
    todo: list[tuple[str, str]] = []
    seen = {"targets"}
    try:  # Updater._load_targets: python-tuf's own verified loader of one delegated role
        top = view.updater._load_targets("targets", "root")
        targets += top.targets.values()
        todo += [(child, "targets") for child in _children(top)]
        while todo:
            role, parent = todo.pop(0)
            if role in seen:
                continue
            seen.add(role)
            if len(seen) > MAX_ROLES:
                raise MirrorRefused(f"more than {MAX_ROLES} delegated roles")
            md = view.updater._load_targets(role, parent)
            targets += md.targets.values()
            todo += [(child, role) for child in _children(md)]
            data, parsed = verified(role)
            delegated.append((f"metadata/{parsed.signed.version}.{quote(role, '')}.json", data))
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError, ValueError) as e:
        raise _refusal(e, view) from e
    metadata = list(delegated)
    for role in ("targets", "snapshot"):
        data, parsed = verified(role)
        metadata.append((f"metadata/{parsed.signed.version}.{role}.json", data))
    root_data, root = verified("root")
    first = Metadata[Root].from_bytes(trusted_root).signed.version
    metadata.append((f"metadata/{first}.root.json", trusted_root))
    for v in range(first + 1, root.signed.version + 1):
        key = f"metadata/{v}.root.json"
        data = root_data if v == root.signed.version else view.fetcher.served[key]
        metadata.append((key, data))
    metadata.append(("metadata/root.json", root_data))  # the current root, unversioned
    ts_data, ts = verified("timestamp")
    metadata.append(("metadata/timestamp.json", ts_data))
    assert isinstance(ts.signed, Timestamp)
    return _State(ts.signed.version, ts.signed.snapshot_meta.version, root.signed.version,
                  metadata, targets)  # fmt: skip


def _children(md: Targets) -> list[str]:
    d = md.delegations
    if d is None:
        return []
    if d.succinct_roles is not None:
        return list(d.succinct_roles.get_roles())
    return list((d.roles or {}).keys())


# -- copying ----------------------------------------------------------------------------------


def _target_key(info: TargetFile) -> str:
    """Where a device fetches the target (consistent snapshot, hash-prefixed names)."""
    dirname, sep, basename = info.path.rpartition("/")
    return f"targets/{dirname}{sep}{next(iter(info.hashes.values()))}.{basename}"


def _download_targets(view: TufView, dest: Storage, infos: list[TargetFile],
                      result: SyncResult) -> tuple[dict[str, Path], list[Manifest]]:  # fmt: skip
    """The targets the mirror lacks (verified bytes staged in the work folder by storage key,
    until their chunks are in) and every release manifest (whose chunks the mirror must hold)."""
    out: dict[str, Path] = {}
    stage = view.work / "staged"
    stage.mkdir(exist_ok=True)
    manifests: list[Manifest] = []
    for info in infos:
        if info.length > MAX_TARGET_BYTES:
            raise MirrorRefused(f"target {info.path} is {info.length} bytes, over the bound")
        key = _target_key(info)
        try:
            data = dest.get(key, max_bytes=info.length)[0]
            info.verify_length_and_hashes(data)
            result.skipped["targets"] += 1
        except (OtaError, tuf_exc.LengthOrHashMismatchError):
            try:
                data = view.download(info, MAX_TARGET_BYTES)
            except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
                raise _refusal(e, view) from e
            view.fetcher.served.clear()  # the fetcher keeps what it served: not targets
            out[key] = stage / str(len(out))
            out[key].write_bytes(data)
        if info.path.startswith("releases/"):
            try:
                manifests.append(Manifest.from_bytes(data))
                manifests += _deltas.as_manifests(info.custom)  # issue 13: delta blobs too
            except OtaError as e:
                raise MirrorRefused(f"target {info.path} is not a valid manifest: {e}") from e
    return out, manifests


def _copy_blobs(source: Source, dest: Storage, manifests: list[Manifest], result: SyncResult,
                on_write: Progress | None) -> None:  # fmt: skip
    """Copy every blob the mirror lacks, each checked against its address and size: the
    whole-file blob of each multi-chunk file where the source has it (ADR 0014), then every
    chunk blob the source has. A chunk the source lacks is allowed only inside a file whose
    file blob the mirror now holds (ADR 0017: a release stored without chunk blobs; devices
    fetch its chunks as ranges of that blob); any other missing blob refuses the sync."""
    files = {f.sha256: f for m in manifests for f in m.files if len(f.chunks) > 1}
    covered = _copy_file_blobs(source, dest, files, result, on_write)
    chunks: dict[str, int] = {}
    owners: dict[str, set[str]] = {}  # chunk -> the files holding it ("" for a one-chunk file)
    for m in manifests:
        for f in m.files:
            for c in f.chunks:
                chunks[c.sha256] = c.size
                owners.setdefault(c.sha256, set()).add(f.sha256 if len(f.chunks) > 1 else "")
    absent: set[str] = set()  # covered files whose chunk blobs proved absent from the source
    for sha, size in sorted(chunks.items()):
        key = blob_key(sha)
        if dest.exists(key):  # written only once verified, atomically
            result.skipped["blobs"] += 1
            continue
        optional = owners[sha] <= covered  # every file holding it has its file blob here
        if optional and owners[sha] & absent:
            continue  # one probe per file, not one request per chunk
        try:
            data = source.read(key, size)
        except NotFound as e:
            if optional:
                absent |= owners[sha]
                continue
            raise MirrorRefused(f"the source lacks chunk {sha[:12]} that a release names") from e
        _verify_chunk(sha, size, data)
        _write(dest, key, data, "blobs", result, on_write)


def _copy_file_blobs(source: Source, dest: Storage, files: dict[str, FileEntry],
                     result: SyncResult, on_write: Progress | None) -> set[str]:  # fmt: skip
    """Copy the whole-file blobs devices fetch byte ranges of (ADR 0014) where the source has
    them, each checked against its address and the manifest's size (one file in memory at a
    time). Returns the file digests whose blob the mirror holds. A release published before
    ADR 0014 has none: its devices use the chunks."""
    held: set[str] = set()
    for sha, f in sorted(files.items()):
        key = blob_key(sha)
        if dest.exists(key):
            result.skipped["blobs"] += 1
            held.add(sha)
            continue
        try:
            data = source.read(key, f.size)
        except NotFound:
            continue
        _verify_chunk(sha, f.size, data)
        _write(dest, key, data, "blobs", result, on_write)
        held.add(sha)
    return held


def _write(dest: Storage, key: str, data: bytes, kind: str, result: SyncResult,
           on_write: Progress | None) -> None:  # fmt: skip
    if kind == "blobs" and dest.local_root() is not None:
        dest.put_blob(key, data)  # atomic, made durable by the barrier before metadata
    else:
        dest.put(key, data)  # atomic: temp file then rename, or one S3 PUT
    result.copied[kind] += 1
    result.bytes_copied += len(data)
    if on_write is not None:
        on_write(kind, key)


def _put_if_changed(dest: Storage, key: str, data: bytes, result: SyncResult,
                    on_write: Progress | None) -> None:  # fmt: skip
    try:
        if dest.get(key, max_bytes=len(data))[0] == data:
            result.skipped["metadata"] += 1
            return
    except OtaError:
        pass
    _write(dest, key, data, "metadata", result, on_write)


def _verify_chunk(sha256: str, size: int, data: bytes) -> None:
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise MirrorRefused(f"chunk {sha256[:12]} differs from its content address or size")
