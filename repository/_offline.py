"""``ota offline export``: a signed, expiring update medium (a folder or a tar archive).

A medium is a read-only copy of the part of the repository a device needs to install the
chosen releases, laid out exactly like the repository (``metadata/``, ``targets/``,
``blobs/``), so the device runs its ordinary TUF update cycle over it (``ota device update
--from``). What makes it a *medium* and not a mirror is its freshness (ADR 0013):

* ``targets`` and every delegated role (team roles, ``releases``, the hash bins) are carried
  **as published**, byte for byte; no offline key is needed to export. Their expiry must
  outlive the medium: online roles that would expire sooner are re-signed first (``ota
  refresh``), and if a role still expires before the medium (an offline role, or an online
  lifetime shorter than the medium's) the export is refused (:class:`MediumRefused`).
* ``snapshot`` and ``timestamp`` are online-key roles: the medium carries its own, signed
  with the online keys, expiring when the release manager chose. The medium's timestamp also
  carries, signed, what the medium is for (``x-ota-medium``: the releases it carries, the
  hardware tier it is meant for, the device versions a delta medium assumes); devices trust
  nothing else on the medium.
* **Versions are reserved in the repository.** In one publish transaction the export reads the
  head (timestamp ``T``, snapshot ``S``), signs the medium's snapshot ``S+1`` and timestamp
  ``T+1``, and commits the repository at ``S+2``/``T+2``. Hence every medium is newer than
  anything a device could have seen before it, and the repository is newer than every medium:
  online and offline updates interleave and python-tuf's rollback checks (the device's
  metadata folder is shared) never let a device go back, whatever the order. If the commit
  fails, nothing is written to the destination.

Invariants: nothing reaches ``dest`` before the repository commit succeeded and the finished
medium verified with python-tuf from the first trusted root (a fresh ``ngclient`` session over
the staged folder); the destination appears whole (rename of a staged folder, or of a
complete archive file) or not at all. Every chunk copied is re-hashed against its address.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from ota.bundle import (
    SIGNERS_TARGET,
    FileEntry,
    blob_key,
    index_target_path,
    manifest_target_path,
)
from ota.errors import InputError, SecurityError
from ota.repository._blobread import storage_range
from ota.repository._index import UnknownRelease, load_manifest, read_facts, read_index
from ota.repository._meta import MAX_METADATA_BYTES, SERIALIZER, md_key
from ota.repository._meta import now as _now
from ota.repository._project import Project, target_storage_key
from ota.repository._storage import NotFound
from ota.repository._tufview import DirSource, TufView
from ota.repository._txn import Transaction, run

MEDIUM_FORMAT = "edge-ota.medium/1"
MEDIUM_FIELD = "x-ota-medium"  # in the medium's signed timestamp
MAX_DAYS = 3650.0
MAX_RELEASES = 64
_WALK_DEPTH = 8


class MediumRefused(InputError):
    """The medium cannot be made as asked (its expiry outlives a role, a yanked release...)."""


@dataclass(frozen=True)
class ReleaseRef:
    """``NAME`` or ``NAME@VERSION`` from the command line."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ReleaseRef:
        name, sep, version = text.partition("@")
        if not name or (sep and not version) or len(text) > 256:
            raise InputError(f"bad release {text!r}", remedy="give NAME or NAME@VERSION")
        return cls(name, version or None)


@dataclass
class ExportResult:
    dest: str
    archive: bool
    expires: str
    timestamp_version: int
    snapshot_version: int
    releases: dict[str, str]
    device_class: str | None
    delta_from: dict[str, str]
    files: int = 0
    bytes: int = 0
    chunks: int = 0
    chunks_omitted: int = 0
    seconds: float = 0.0
    refreshed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "dest", "archive", "expires", "timestamp_version", "snapshot_version", "releases",
            "device_class", "delta_from", "files", "bytes", "chunks", "chunks_omitted",
            "seconds", "refreshed")}  # fmt: skip


@dataclass
class _Plan:
    """Everything the medium holds but the chunks, decided inside the transaction."""

    files: dict[str, bytes]  # medium key -> bytes (metadata and targets)
    chunks: dict[str, int]  # sha256 -> size
    omitted: int
    releases: dict[str, str]
    delta_from: dict[str, str]
    timestamp_version: int
    snapshot_version: int
    target_paths: list[str]
    # chunk sha256 -> (its file, its offset there): where a chunk is read when the repository
    # stores only its file's blob (ADR 0017); the medium always gets chunk blobs
    where: dict[str, tuple[FileEntry, int]] = field(default_factory=dict)


def export(project: Project, wanted: Iterable[str], dest: Path, *, expires_in_days: float = 14.0,
           device_class: str | None = None, have: Iterable[str] = (),
           archive: bool | None = None) -> ExportResult:  # fmt: skip
    """Write a medium for ``wanted`` (``NAME[@VERSION]``; newest live release when no version)
    to ``dest`` (a folder that must not exist or be empty; a single tar file when ``archive``
    or when ``dest`` ends in ``.tar``). ``have`` (``NAME@VERSION``) makes a delta medium: the
    chunks of those releases are left out (a device that runs them has them).

    Raises:
        InputError: bad arguments, an unknown or yanked release, one not for ``device_class``.
        MediumRefused: a role the device consults expires before the medium would.
        ConfigError: the online keys are not configured. ConflictError: endless conflicts.
    """
    t0 = time.monotonic()
    refs = [ReleaseRef.parse(w) for w in wanted]
    bases = [ReleaseRef.parse(h) for h in have]
    if not refs or len(refs) > MAX_RELEASES:
        raise InputError(f"give 1 to {MAX_RELEASES} releases to export")
    if len({r.name for r in refs}) != len(refs):
        raise InputError("one release per model on a medium")
    if any(b.version is None for b in bases):
        raise InputError("--have needs NAME@VERSION (the version the devices run)")
    if not 0 < expires_in_days <= MAX_DAYS:
        raise InputError(f"--expires-in must be in (0, {MAX_DAYS:g}] days")
    dest = Path(dest)
    as_archive = dest.suffix == ".tar" if archive is None else archive
    _check_dest(dest, as_archive)
    from ota.repository._keyadmin import refresh

    refreshed = refresh(project, within_days=expires_in_days + 1).resigned
    expires = _now() + timedelta(days=expires_in_days)
    plan = run(project.storage, project.signers, project.expiry(),
               lambda txn: _plan(project, txn, refs, bases, expires, device_class))  # fmt: skip
    parent = dest.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ota-medium-", dir=parent) as tmp:
        stage = Path(tmp) / "medium"
        nbytes = _write_stage(project, stage, plan)
        _self_check(stage, plan)
        if as_archive:
            _tar(stage, dest)
        else:
            if dest.exists():
                dest.rmdir()  # checked empty above
            stage.rename(dest)
    return ExportResult(str(dest), as_archive, expires.isoformat(), plan.timestamp_version,
                        plan.snapshot_version, plan.releases, device_class, plan.delta_from,
                        len(plan.files) + len(plan.chunks), nbytes, len(plan.chunks),
                        plan.omitted, round(time.monotonic() - t0, 3), refreshed)  # fmt: skip


def _check_dest(dest: Path, as_archive: bool) -> None:
    if as_archive:
        if dest.exists():
            raise InputError(f"{dest} exists", remedy="give a new archive file name")
        return
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(
            f"{dest} exists and is not an empty folder",
            remedy="give a new or empty folder (a medium is written whole)",
        )


# -- the transaction: what the medium holds, and the medium's own snapshot/timestamp ----------


def _plan(project: Project, txn: Transaction, refs: list[ReleaseRef], bases: list[ReleaseRef],
          expires: datetime, device_class: str | None) -> _Plan:  # fmt: skip
    store = project.storage
    root = txn.root()
    if root.signed.expires < expires:
        raise MediumRefused(f"root expires {root.signed.expires.isoformat()}, before the medium",
                            remedy="choose a shorter --expires-in, or renew the root first "
                            "(docs/runbooks/key-rotation.md)")  # fmt: skip
    releases: dict[str, str] = {}
    paths = [SIGNERS_TARGET]
    for ref in refs:
        releases[ref.name] = _pick(txn, ref, device_class)
        paths += [index_target_path(ref.name), manifest_target_path(ref.name, releases[ref.name])]
    chunks, omitted, delta_from, where = _chunks(project, txn, releases, bases)
    files = _carry_targets(project, txn, paths, expires)
    snap = txn.snapshot.signed
    for name, meta in snap.meta.items():  # every targets role the repository lists
        role = name.removesuffix(".json")
        key = md_key(role, meta.version)
        files[key] = store.get(key, max_bytes=MAX_METADATA_BYTES)[0]
    for v in range(1, root.signed.version + 1):
        files[md_key(Root.type, v)] = store.get(md_key(Root.type, v),
                                                max_bytes=MAX_METADATA_BYTES)[0]  # fmt: skip
    # the medium's own snapshot (S+1) and timestamp (T+1), online keys, the chosen expiry
    medium_snap = Metadata[Snapshot].from_bytes(txn.snapshot.to_bytes(SERIALIZER))
    medium_snap.signed.version = snap.version + 1
    medium_snap.signed.expires = expires
    _sign(project, txn, medium_snap, Snapshot.type)
    snap_bytes = medium_snap.to_bytes(SERIALIZER)
    files[md_key(Snapshot.type, medium_snap.signed.version)] = snap_bytes
    desc = {"format": MEDIUM_FORMAT, "releases": releases, "device_class": device_class,
            "delta_from": delta_from}  # fmt: skip
    ts = Metadata(Timestamp(
        version=txn.timestamp.signed.version + 1, expires=expires,
        snapshot_meta=MetaFile(version=medium_snap.signed.version, length=len(snap_bytes)),
        unrecognized_fields={MEDIUM_FIELD: desc}))  # fmt: skip
    _sign(project, txn, ts, Timestamp.type)
    files["metadata/timestamp.json"] = ts.to_bytes(SERIALIZER)
    # the repository moves past the medium: snapshot S+2, timestamp T+2 at commit
    txn.snapshot.signed.version += 1
    txn.timestamp.signed.version += 1
    txn.resign(Snapshot.type)
    return _Plan(files, chunks, omitted, releases, delta_from, ts.signed.version,
                 medium_snap.signed.version, paths, where)  # fmt: skip


def _chunks(
    project: Project,
    txn: Transaction,
    releases: dict[str, str],
    bases: list[ReleaseRef],
) -> tuple[dict[str, int], int, dict[str, str], dict[str, tuple[FileEntry, int]]]:
    """Chunks the releases need (sha256 -> size) less those of the ``bases``; how many were
    left out; the bases by model; where each chunk is in its file (ADR 0017)."""
    chunks: dict[str, int] = {}
    where: dict[str, tuple[FileEntry, int]] = {}
    for name, version in releases.items():
        for f in load_manifest(project.storage, txn, name, version).files:
            offset = 0
            for c in f.chunks:
                chunks[c.sha256] = c.size
                where.setdefault(c.sha256, (f, offset))
                offset += c.size
    delta_from: dict[str, str] = {}
    omitted = 0
    for b in bases:
        assert b.version is not None
        delta_from[b.name] = b.version
        for f in load_manifest(project.storage, txn, b.name, b.version).files:
            for c in f.chunks:
                if chunks.pop(c.sha256, None) is not None:
                    omitted += 1
    return chunks, omitted, delta_from, where


def _carry_targets(project: Project, txn: Transaction, paths: list[str],
                   expires: datetime) -> dict[str, bytes]:  # fmt: skip
    """The target files at ``paths`` (by storage key), each checked against its TUF target,
    after checking every role a device consults to find them outlives the medium."""
    files: dict[str, bytes] = {}
    for path in paths:
        info, roles = _lookup(txn, path)
        if info is None:
            if path == SIGNERS_TARGET:
                continue
            raise SecurityError(f"{path} is not a target of the repository")
        for role in roles:
            if (exp := txn.targets(role).signed.expires) < expires:
                raise MediumRefused(
                    f"role {role} expires {exp.isoformat()}, before the medium would",
                    remedy="choose a shorter --expires-in; or lengthen that role's lifetime "
                    "([expiry] in ota.toml, then `ota refresh`), or re-sign it offline",
                )
        key = target_storage_key(info.path, info.hashes["sha256"])
        data = project.storage.get(key, max_bytes=info.length)[0]
        info.verify_length_and_hashes(data)
        files[key] = data
    return files


def _sign(project: Project, txn: Transaction, md: Metadata[Any], role: str) -> None:
    keys, threshold = txn.role_keys(role)
    project.signers.sign(md, keys, threshold, role)


def _pick(txn: Transaction, ref: ReleaseRef, device_class: str | None) -> str:
    """The version to carry: the one asked for, or the newest live one; never a yanked one,
    never one whose signed facts exclude ``device_class``."""
    index = read_index(txn, ref.name)
    if index is None:
        raise UnknownRelease(f"no model named {ref.name}")
    live = [r for r in index.releases if not r.yanked]
    if ref.version is None:
        if not live:
            raise MediumRefused(f"{ref.name} has no live (unyanked) release")
        version = max(live, key=lambda r: r.counter).version
    else:
        entry = index.get(ref.version)
        if entry is None:
            raise UnknownRelease(f"{ref.name} {ref.version} is not a live release")
        if entry.yanked:
            raise MediumRefused(f"{ref.name} {ref.version} is yanked: not put on a medium")
        version = ref.version
    facts = read_facts(txn, ref.name, version)
    if facts is None:
        raise SecurityError(f"the index lists {ref.name} {version} but it has no target")
    tiers = facts.release.compat.tiers
    if device_class is not None and tiers and device_class not in tiers:
        raise MediumRefused(f"{ref.name} {version} is for hardware tiers {list(tiers)}, "
                            f"not {device_class}")  # fmt: skip
    return version


def _lookup(txn: Transaction, path: str) -> tuple[TargetFile | None, list[str]]:
    """The target ``path`` and every role a TUF client consults to find it (the same walk as
    python-tuf's and :meth:`Transaction.bin_for`: first matching delegation, terminating)."""
    role = Targets.type
    roles = [role]
    for _ in range(_WALK_DEPTH):
        signed = txn.targets(role).signed
        if path in signed.targets:
            return signed.targets[path], roles
        if signed.delegations is None:
            return None, roles
        child = next(iter(signed.delegations.get_roles_for_target(path)), None)
        if child is None:
            return None, roles
        role = child[0]
        roles.append(role)
    raise SecurityError(f"delegation tree too deep for {path}")


# -- writing and checking ---------------------------------------------------------------------


def _write_stage(project: Project, stage: Path, plan: _Plan) -> int:
    total = 0
    for key, data in plan.files.items():
        _put(stage, key, data)
        total += len(data)
    for sha, size in sorted(plan.chunks.items()):
        try:
            data = _read_chunk(project, sha, size, plan.where.get(sha))
        except NotFound as e:
            raise SecurityError(f"the repository lacks chunk {sha[:12]} a release names") from e
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise SecurityError(f"stored chunk {sha[:12]} differs from its address")
        _put(stage, blob_key(sha), data)
        total += size
    return total


def _read_chunk(project: Project, sha: str, size: int, where: tuple[FileEntry, int] | None,
                ) -> bytes:  # fmt: skip
    """A chunk's stored bytes (unverified: the caller checks them): its chunk blob, or its
    range of its file's blob when the repository stores only that (ADR 0017).

    Raises:
        NotFound: in neither.
    """
    try:
        return project.storage.get(blob_key(sha), max_bytes=size)[0]
    except NotFound:
        if where is None or len(where[0].chunks) < 2:
            raise
        f, offset = where
        return storage_range(project.storage, blob_key(f.sha256), offset, offset + size)


def _put(stage: Path, key: str, data: bytes) -> None:
    path = stage / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _self_check(stage: Path, plan: _Plan) -> None:
    """Verify the staged medium as a device would: python-tuf from the first root."""
    root1 = plan.files[md_key(Root.type, 1)]
    with tempfile.TemporaryDirectory(prefix="ota-medium-check-") as work:
        try:
            view = TufView(DirSource(stage), root1, Path(work))
            view.updater.refresh()
            for path in plan.target_paths:
                info = view.target(path)
                if info is None:
                    if path == SIGNERS_TARGET:
                        continue
                    raise SecurityError(f"{path} does not verify on the medium")
                view.download(info, info.length)
        except SecurityError:
            raise
        except Exception as e:  # python-tuf's refusal: the export is wrong, write nothing
            raise SecurityError(f"the medium does not verify: {type(e).__name__}: {e}") from e


def _tar(stage: Path, dest: Path) -> None:
    """A plain (uncompressed: chunks are already dense) tar, complete before it is named."""
    tmp = dest.with_name(f".{dest.name}.partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(stage).as_posix(), recursive=False)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.rename(dest)
    shutil.rmtree(stage, ignore_errors=True)
