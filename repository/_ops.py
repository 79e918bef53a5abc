"""Rollout steering and housekeeping: promote, pause, yank, rollback, releases, gc.

Each change is one metadata transaction (re-run on conflict), signed with the online bins key:
steering a rollout never needs the offline keys, and cannot publish a new bundle either (a bundle
needs the release manager's signature, see ``docs/threat-model.md``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ota.bundle import (
    RELEASE_FILE,
    RINGS,
    SIGNATURE_FILE,
    FileEntry,
    Manifest,
    ModelIndex,
    Release,
    RolloutState,
    TargetFacts,
    blob_key,
    index_target_path,
    manifest_target_path,
    validate_name,
    validate_version,
)
from ota.client._policy import content_counter
from ota.errors import InputError, OtaError, SecurityError
from ota.repository import (
    _auditlog,  # issue 4: every steering change is logged
    _deltas,  # issue 13: delta blobs are referenced too
)
from ota.repository._chunker import Uploader
from ota.repository._index import (
    UnknownRelease,
    load_manifest,
    model_names,
    read_facts,
    read_index,
    update_rollout,
)
from ota.repository._preflight import require_keys
from ota.repository._project import Project, target_storage_key
from ota.repository._publish import PublishResult, _finish, _now
from ota.repository._trust import read_signers
from ota.repository._txn import Transaction


class BelowFloor(SecurityError):
    """A rollback to content below the security floor (devices would refuse it): exit 4."""


def _steer(
    project: Project, name: str, version: str, event: str, **changes: object
) -> RolloutState:
    validate_name(name)
    validate_version(version)
    require_keys(project, event, targets=[index_target_path(name)])  # issue 12 (17)
    _current(project, name, version)  # issue 12 (17): a typo appends no audit entry either
    return _auditlog.run_logged(  # issue 4: the commit anchors its audit log entry
        project,
        event,
        lambda txn: update_rollout(project, txn, name, version, **changes),
        subject=f"{name} {version}",
        details={k: repr(v) if isinstance(v, float) else v for k, v in changes.items()},
    )


def promote(project: Project, name: str, version: str, ring: str, percent: float) -> RolloutState:
    """Move a release to ``ring`` at ``percent`` (and un-pause it).

    The percentage applies to ``ring`` only (the ring being entered): devices of the rings
    before it, which the release has passed, may all install it (``docs/runbooks/rollout.md``).

    Raises:
        InputError: unknown ring, percent out of range, unknown or yanked release.
    """
    if ring not in RINGS:
        raise InputError(f"unknown ring {ring!r}", remedy=f"use one of {', '.join(RINGS)}")
    if not 0.0 <= percent <= 100.0:
        raise InputError("--percent must be between 0 and 100")
    state = _current(project, name, version)
    if state.yanked:
        raise InputError(f"{name} {version} is yanked", remedy="publish a new release instead")
    return _steer(project, name, version, "promote", ring=ring, percent=percent, paused=False)


def pause(project: Project, name: str, version: str, paused: bool = True) -> RolloutState:
    """Stop (or resume) new installs of a release; devices that have it keep it."""
    return _steer(project, name, version, "pause" if paused else "resume", paused=paused)


def yank(project: Project, name: str, version: str, yanked: bool = True) -> RolloutState:
    """Withdraw a release: no device installs it, devices running it revert to their previous
    slot (see ``docs/runbooks/rollback.md``)."""
    return _steer(project, name, version, "yank" if yanked else "unyank", yanked=yanked)


def _current(project: Project, name: str, version: str) -> RolloutState:
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    index = read_index(txn, name)
    state = index.get(version) if index else None
    if state is None:
        raise UnknownRelease(f"{name} {version} is not a live release")
    return state


def rollback(
    project: Project, name: str, to_version: str, *, ring: str = "ga", percent: float = 100.0
) -> PublishResult:
    """Publish a new release (higher counter) whose files are those of ``to_version``.

    Nothing is re-uploaded but the new ``release.json`` and signature; devices that still hold
    the old chunks download almost nothing. The new version is ``<to_version>+rollback.<n>``.

    The new release's facts carry the counter of the release whose content it re-publishes
    (``content_counter``, signed by the release key): devices judge it by that counter
    against the security floor, never by its own newer counter (DESIGN decision 4). So a
    rollback to content below the model's floor is refused here.

    Raises:
        UnknownRelease: ``to_version`` is not published.
        BelowFloor: ``to_version``'s content is below the model's security floor.
    """
    validate_name(name)
    validate_version(to_version)
    require_keys(  # issue 12 (17): before the new release.json is signed and uploaded
        project, "rollback", release_key=True,
        targets=[manifest_target_path(name, to_version), index_target_path(name)],
    )  # fmt: skip
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    facts = read_facts(txn, name, to_version)
    if facts is None:
        raise UnknownRelease(f"{name} {to_version} is not published")
    old = load_manifest(project.storage, txn, name, to_version)
    _check_signed_facts(project, txn, facts, old, name, to_version)  # release-key-signed
    content = content_counter(facts.release)
    index = read_index(txn, name)
    floor = max(index.security_floor if index else 0, facts.release.security_floor)
    if content < floor:
        raise BelowFloor(
            f"refused: {name} {to_version} carries the content of release counter {content}, "
            f"below the security floor {floor}; devices would refuse it",
            remedy=f"roll back to a release at or above counter {floor} (see `ota releases`), "
            "or publish a fixed release",
        )
    entries: dict[str, FileEntry] = {f.path: f for f in old.files}
    base = to_version.split("+", 1)[0]
    staging_root = project.root_dir / ".staging"
    staging_root.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_root) as tmp, Uploader(project.storage) as up:
        up.known.update(old.chunk_digests())

        def release_for(counter: int) -> Release:
            return Release(
                name=name,
                version=f"{base}+rollback.{counter}",
                counter=counter,
                kind=facts.release.kind,
                compat=facts.release.compat,
                security_floor=facts.release.security_floor,
                smoke=facts.release.smoke,
                model_path=facts.release.model_path,
                rollback_of=to_version,
                created=_now(),
                content_counter=content,
            )

        payload = {p: e for p, e in entries.items() if p not in (RELEASE_FILE, SIGNATURE_FILE)}
        return _finish(project, Path(tmp), payload, up, release_for, ring, percent)


def _check_signed_facts(
    project: Project,
    txn: Transaction,
    facts: TargetFacts,
    manifest: Manifest,
    want_name: str,
    want_version: str,
) -> None:
    """Raise unless ``facts`` are what the release key signed: the release target's facts
    are signed by the online bins key alone, and a rollback signs their counter (as
    ``content_counter``) and the manifest's files with the release key. So, as a device
    checks before it installs: ``release.json`` of the manifest equals the facts, and the
    manifest's signature is by a key ``trust/signers.json`` allows for the model.

    Raises:
        SecurityError: another model or version; the facts, ``release.json`` or the
            signature disagree.
    """
    from ota.signing import verify_digests

    name = facts.release.name
    if (name, facts.release.version) != (manifest.name, manifest.version) or (
        manifest.name, manifest.version) != (want_name, want_version):  # fmt: skip
        raise SecurityError(
            f"the target of {want_name} {want_version} holds {name} {facts.release.version} "
            f"(manifest {manifest.name} {manifest.version}), not {want_name} {want_version}: "
            "the online-signed metadata was altered; nothing was published",
            remedy="treat the online keys as compromised (docs/runbooks/incident.md)",
        )

    def read(path: str, limit: int) -> bytes:
        entry = manifest.file(path)
        if entry.size > limit:
            raise SecurityError(f"{path} of {name} {facts.release.version} is too large")
        from ota.repository._blobread import read_file, storage_readers

        try:  # either layout (ADR 0017); every chunk and the file digest checked
            return read_file(entry, *storage_readers(project.storage))
        except SecurityError as e:
            raise SecurityError(f"stored {path} of {name} does not match its manifest") from e

    if (
        facts.digests.get(RELEASE_FILE) != manifest.file(RELEASE_FILE).sha256
        or read(RELEASE_FILE, 1024 * 1024) != facts.release.to_bytes()
    ):
        raise SecurityError(
            f"the facts of {name} {facts.release.version} differ from its signed release.json: "
            "the online-signed metadata was altered; nothing was published",
            remedy="treat the online keys as compromised (docs/runbooks/incident.md)",
        )
    signature = read(SIGNATURE_FILE, 4 * 1024 * 1024)  # as ota.signing bounds it
    digests = {f.path: f.sha256 for f in manifest.files if f.path != SIGNATURE_FILE}
    for signer in read_signers(project, txn):
        if not signer.allows(name):
            continue
        try:
            verify_digests(
                signature, signer.public_key_pem.encode(), digests, signature_name=SIGNATURE_FILE
            )
            return
        except OtaError:
            continue
    raise SecurityError(
        f"{name} {facts.release.version} is not signed by a key trusted for "
        f"{name}: its release.json cannot be trusted; nothing was published"
    )


@dataclass(frozen=True)
class ReleaseRow:
    name: str
    state: RolloutState
    floor: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "security_floor": self.floor, **self.state.to_dict()}


def releases(project: Project, name: str | None = None) -> list[ReleaseRow]:
    """Live releases with their rollout state, newest first, for one model or all."""
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    names = [validate_name(name)] if name else model_names(project.storage)
    rows: list[ReleaseRow] = []
    for n in names:
        index = read_index(txn, n)
        if index is None:
            if name:
                raise UnknownRelease(f"no model named {name}")
            continue
        rows += [
            ReleaseRow(n, r, index.security_floor)
            for r in sorted(index.releases, key=lambda r: -r.counter)
        ]
    return rows


def model_index(project: Project, name: str) -> ModelIndex | None:
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    return read_index(txn, name)


@dataclass(frozen=True)
class GcResult:
    referenced: int
    deleted: int
    kept_young: int
    bytes_freed: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def gc(project: Project, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcResult:
    """Delete blobs no published release references.

    Blobs younger than ``grace_seconds`` are kept: they may belong to a publish in progress
    (chunks are uploaded before the metadata that names them).

    Raises:
        InputError: ``grace_seconds`` is negative or not a number (NaN compares false
            with every age: it would delete the blobs of a publish in progress).
    """
    if not grace_seconds >= 0:
        raise InputError(f"grace must be a number of seconds >= 0, not {grace_seconds}",
                         remedy="pass --grace 3600 (the default) or more")  # fmt: skip
    store = project.storage
    txn = Transaction.begin(store, project.signers, project.expiry())
    referenced: set[str] = set()
    for role in txn.release_roles():  # team roles and the online bins
        for path, info in txn.targets(role).signed.targets.items():
            if not path.startswith("releases/"):
                continue
            data, _ = store.get(target_storage_key(path, info.hashes["sha256"]))
            from ota.bundle import Manifest

            manifest = Manifest.from_bytes(data)
            referenced |= {blob_key(d) for d in manifest.chunk_digests()}
            referenced |= {blob_key(f.sha256) for f in manifest.files}  # ADR 0014 file blobs
            referenced |= _deltas.referenced_blobs(info.custom)  # issue 13: delta blobs
    from ota.repository._fileblob import sweep_temp

    sweep_temp(store, grace_seconds, dry_run=dry_run)  # ADR 0017: killed publishers' copies
    deleted = young = freed = 0
    now = time.time()
    for key, size, mtime in store.list_detailed("blobs/"):
        if key in referenced:
            continue
        if mtime is not None and now - mtime < grace_seconds:
            young += 1
            continue
        if not dry_run:
            store.delete(key)
        deleted += 1
        freed += size
    return GcResult(len(referenced), deleted, young, freed)
