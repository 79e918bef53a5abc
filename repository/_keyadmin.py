"""Key rotation, revocation, expiry refresh and the key inventory.

* :func:`rotate` replaces the key of ``timestamp``, ``snapshot`` or ``targets`` through a new
  root (signed and published here when this machine holds the root keys, otherwise written
  unsigned for the offline ceremony), or the online ``bins`` key through one transaction that
  edits the ``releases`` delegation (offline targets key) and re-signs every hash bin.
* :func:`revoke` removes a key wherever it is listed: root roles, the ``releases`` role and
  bins, team roles, ``trust/signers.json``. A role that would fall under its threshold needs a
  replacement key.
* :func:`refresh` re-signs the online roles that expire soon; safe to run from cron.

Trust decisions stay with python-tuf: roots are checked by
:func:`~ota.repository._rootceremony.verify_rotation`, every written role by the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from ota.bundle import SignerEntry
from ota.errors import InputError
from ota.repository._delegate import revoke_team_key
from ota.repository._keyspec import KeySpec
from ota.repository._rootceremony import (
    RootChange,
    export_root,
    publish_root,
    sign_with_project,
    write_root_file,
)
from ota.repository._trust import read_signers, write_signers
from ota.repository._txn import RELEASES_ROLE, Transaction, newest_root, run

if TYPE_CHECKING:
    from ota.repository._project import Project

ROTATABLE = ("timestamp", "snapshot", "targets", "bins")
_OFFLINE_WARNING = timedelta(days=30)


@dataclass(frozen=True)
class KeyChange:
    """What a rotation or revocation did."""

    actions: list[str] = field(default_factory=list)
    root_version: int | None = None
    root_published: bool = False
    unsigned_root: Path | None = None
    new_keyid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "actions": self.actions,
            "root_version": self.root_version,
            "root_published": self.root_published,
            "unsigned_root": str(self.unsigned_root) if self.unsigned_root else None,
            "new_keyid": self.new_keyid,
        }


def new_role_key(project: Project, role: str) -> KeySpec:
    """Generate an Ed25519 key file for ``role`` under ``keys/online`` or ``keys/offline``."""
    from ota.signing import generate_key

    where = "offline" if role in ("root", "targets") else "online"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    uri, key = generate_key(project.root_dir / "keys" / where, f"{role}-{stamp}")
    return KeySpec(key, uri)


def _finish_root(
    project: Project, md: Metadata[Root], out: Path | None, actions: list[str], new_keyid: str
) -> KeyChange:
    project.save_config()  # the new keys' URIs must survive a ceremony that takes days
    version = md.signed.version
    if sign_with_project(project, md):
        published = publish_root(project, md)
        actions.append(f"published root {version}; re-signed {', '.join(published.resigned)}")
        return KeyChange(actions, version, True, None, new_keyid)
    path = out or project.root_dir / f"root-{version}.unsigned.json"
    write_root_file(md, path)
    actions.append(f"wrote unsigned root {version} to {path}: sign it with `ota root sign`")
    return KeyChange(actions, version, False, path, new_keyid)


def rotate(
    project: Project, role: str, new_key: KeySpec | None = None, *, out: Path | None = None
) -> KeyChange:
    """Replace every key of ``role`` with ``new_key`` (generated when None).

    Raises:
        InputError: unknown role.
        ConfigError: the targets key (bins) is not configured; a new key cannot sign.
        SecurityError / ConflictError: see :func:`~ota.repository._rootceremony.publish_root`.
    """
    if role not in ROTATABLE:
        raise InputError(f"cannot rotate {role!r}", remedy=f"use one of {', '.join(ROTATABLE)}")
    key = new_key or new_role_key(project, role)
    if key.uri:
        project.set_signer(key.keyid, key.uri)
    project.save_config()
    if role == "bins":
        actions = rotate_bins(project, key)
        return KeyChange(actions, new_keyid=key.keyid)
    current = newest_root(project.storage).signed
    old = list(current.roles[role].keyids)
    change = RootChange(
        add=[(role, key)], remove=[(role, k) for k in old if k != key.keyid], thresholds={role: 1}
    )
    actions = [f"{role}: {', '.join(k[:16] for k in old)} -> {key.keyid[:16]}"]
    return _finish_root(project, export_root(project, change), out, actions, key.keyid)


def rotate_bins(project: Project, key: KeySpec, only: str | None = None) -> list[str]:
    """Replace the online bins key (all of them, or ``only``) in one transaction.

    Edits the ``releases`` delegation in top-level targets (offline key) and the hash-bin
    delegation in ``releases``, and re-signs every bin with the new key.
    """

    def change(txn: Transaction) -> list[str]:
        top = txn.edit(Targets.type)
        old = [k for k in top.get_delegated_role(RELEASES_ROLE).keyids if only in (None, k)]
        for k in old:
            top.revoke_key(k, RELEASES_ROLE)
        top.add_key(key.key, RELEASES_ROLE)
        rel = txn.edit(RELEASES_ROLE)
        for k in old:
            rel.revoke_key(k)
        rel.add_key(key.key)
        bins = list(txn.succinct().get_roles())
        for b in bins:
            txn.resign(b)
        return [
            f"bins: {', '.join(k[:16] for k in old)} -> {key.keyid[:16]}; "
            f"re-signed releases and {len(bins)} bins"
        ]

    return run(project.storage, project.signers, project.expiry(), change)


@dataclass(frozen=True)
class KeyRow:
    keyid: str
    kind: str  # "tuf" or "model-signing"
    roles: tuple[str, ...]
    uri_configured: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"roles": list(self.roles)}


def list_keys(project: Project) -> list[KeyRow]:
    """Every key the repository lists, where, and whether this machine can sign with it."""
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    root = txn.root().signed
    where: dict[str, list[str]] = {}
    for role, r in root.roles.items():
        for k in r.keyids:
            where.setdefault(k, []).append(role)
    top = txn.targets().signed
    for name in [*txn.team_roles(), RELEASES_ROLE]:
        for k in top.get_delegated_role(name).keyids:
            where.setdefault(k, []).append("bins" if name == RELEASES_ROLE else f"team:{name}")
    rows = [KeyRow(k, "tuf", tuple(v), k in project.config.signers) for k, v in where.items()]
    for e in read_signers(project, txn):
        rows.append(KeyRow(e.keyid, "model-signing", e.models, False))
    return rows


def resolve_keyid(project: Project, prefix: str) -> str:
    """The one listed key id starting with ``prefix`` (8+ hex digits).

    Raises:
        InputError: no key, or several, match.
    """
    found = {r.keyid for r in list_keys(project) if r.keyid.startswith(prefix.lower())}
    if len(prefix) < 8 or len(found) != 1:
        raise InputError(f"no unique key matches {prefix!r}", remedy="see `ota key list`")
    return found.pop()


def revoke(
    project: Project,
    keyid: str,
    *,
    replacement: KeySpec | None = None,
    signing_replacement: bytes | None = None,
    force: bool = False,
    out: Path | None = None,
) -> KeyChange:
    """Remove a compromised key wherever it is listed (see the module docstring).

    ``replacement`` replaces a TUF key, ``signing_replacement`` (a P-256 PEM) a model-signing
    key. ``force`` lets a team role or a model glob fall under its threshold (its releases are
    refused until it gets a new key); root roles and the bins never may.

    Raises:
        InputError: the key is listed nowhere; a role would fall under its threshold.
        ConfigError: the offline targets key (or a root key, to publish here) is missing.
    """
    keyid = resolve_keyid(project, keyid)
    rows = [r for r in list_keys(project) if r.keyid == keyid]
    actions: list[str] = []
    if replacement is not None and replacement.uri:
        project.set_signer(replacement.keyid, replacement.uri)
    for row in rows:
        if row.kind == "model-signing":
            actions.append(_revoke_signing_key(project, keyid, signing_replacement, force))
    teams = [r[len("team:") :] for row in rows for r in row.roles if r.startswith("team:")]
    for team in teams:
        revoke_team_key(project, team, keyid, replacement=replacement, force=force)
        actions.append(f"removed {keyid[:16]} from team {team}")
    if any("bins" in row.roles for row in rows):
        if replacement is None:
            raise InputError("the bins key needs a --replacement key")
        actions += rotate_bins(project, replacement, only=keyid)
    top_level = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
    root_roles = [r for row in rows for r in row.roles if r in top_level]
    result = KeyChange(actions)
    if root_roles:
        result = _revoke_in_root(project, keyid, root_roles, replacement, out, actions)
    project.set_signer(keyid, None)
    project.save_config()
    return result


def _revoke_in_root(
    project: Project,
    keyid: str,
    roles: list[str],
    replacement: KeySpec | None,
    out: Path | None,
    actions: list[str],
) -> KeyChange:
    root = newest_root(project.storage).signed
    add = []
    for role in roles:
        r = root.roles[role]
        if len(r.keyids) - 1 < r.threshold:
            if replacement is None:
                raise InputError(
                    f"revoking {keyid[:16]} leaves {role} under its threshold {r.threshold}",
                    remedy="pass --replacement KEY",
                )
            add.append((role, replacement))
    change = RootChange(add=add, remove=[(role, keyid) for role in roles])
    actions.append(f"removed {keyid[:16]} from root roles {', '.join(roles)}")
    new_keyid = replacement.keyid if replacement is not None else ""
    return _finish_root(project, export_root(project, change), out, actions, new_keyid)


def _revoke_signing_key(
    project: Project, fingerprint: str, replacement: bytes | None, force: bool
) -> str:
    from ota.repository._project import key_fingerprint

    def change(txn: Transaction) -> str:
        entries = read_signers(project, txn)
        gone = [e for e in entries if e.keyid == fingerprint]
        kept = [e for e in entries if e.keyid != fingerprint]
        globs = {g for e in gone for g in e.models}
        orphaned = sorted(g for g in globs if not any(g in e.models for e in kept))
        if replacement is not None:
            new = SignerEntry(
                key_fingerprint(replacement), replacement.decode(), tuple(sorted(globs))
            )
            kept.append(new)
        elif orphaned and not force:
            raise InputError(
                f"revoking model-signing key {fingerprint[:16]} leaves {', '.join(orphaned)} "
                "without a signer",
                remedy="pass --replacement-signing PUB.pem, or --force",
            )
        write_signers(project, txn, kept)
        return f"removed model-signing key {fingerprint[:16]} from trust/signers.json"

    return run(project.storage, project.signers, project.expiry(), change)


@dataclass(frozen=True)
class RefreshResult:
    resigned: list[str]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"resigned": self.resigned, "warnings": self.warnings}


def refresh(project: Project, within_days: float | None = None) -> RefreshResult:
    """Re-sign online roles (timestamp, snapshot, ``releases``, bins) expiring within
    ``within_days`` (default: half of each role's lifetime). Idempotent: nothing is written
    when nothing is due. Offline roles (root, targets, teams) that are due are only warned
    about: their keys are not on this machine.

    Offline roles are warned about within ``within_days`` or 30 days (or half their lifetime,
    if shorter).

    Raises:
        ConfigError: an online key is not configured; ConflictError: endless conflicts.
    """
    now = datetime.now(UTC)

    def due(txn: Transaction, role: str, expires: datetime, offline: bool = False) -> bool:
        if within_days is not None:
            window = timedelta(days=within_days)
        else:
            window = (
                min(txn.lifetime(role) / 2, _OFFLINE_WARNING)
                if offline
                else (txn.lifetime(role) / 2)
            )
        return expires - now < window

    def change(txn: Transaction) -> RefreshResult:
        resigned: list[str] = []
        for role in [RELEASES_ROLE, *txn.succinct().get_roles()]:
            if due(txn, role, txn.targets(role).signed.expires):
                txn.resign(role)
                resigned.append(role)
        for role, md in ((Snapshot.type, txn.snapshot), (Timestamp.type, txn.timestamp)):
            if resigned or due(txn, role, md.signed.expires):
                txn.resign(role)
                resigned.append(role)
        warnings = []
        offline = [(Root.type, txn.root().signed.expires)] + [
            (r, txn.targets(r).signed.expires)
            for r in (Targets.type, *txn.team_roles())
            if f"{r}.json" in txn.snapshot.signed.meta
        ]
        for role, expires in offline:
            if due(txn, role, expires, offline=True):
                warnings.append(f"{role} expires {expires.isoformat()}: re-sign it offline")
        return RefreshResult(resigned, warnings)

    return run(project.storage, project.signers, project.expiry(), change)
