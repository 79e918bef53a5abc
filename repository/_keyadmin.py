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

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.signer import Key
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from ota import _atomic
from ota.bundle import SignerEntry
from ota.errors import ConfigError, InputError, SecurityError
from ota.repository._delegate import revoke_team_key
from ota.repository._keyspec import KeySpec
from ota.repository._preflight import key_problem, require_keys
from ota.repository._rootceremony import (
    RootChange,
    export_root,
    publish_root,
    verify_rotation,
    write_root_file,
)
from ota.repository._trust import read_signers, write_signers
from ota.repository._txn import RELEASES_ROLE, Transaction, newest_root, run
from ota.signing import NewKey

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


@dataclass(frozen=True)
class _FreshKey:
    """A role key generated in memory, written to its project folder only on :meth:`write`."""

    key: NewKey
    folder: Path
    name: str

    @classmethod
    def make(cls, project: Project, role: str) -> _FreshKey:
        where = "offline" if role in ("root", "targets") else "online"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        fresh = cls(
            NewKey.generate("ed25519"), project.root_dir / "keys" / where, f"{role}-{stamp}"
        )
        fresh.key.paths(fresh.folder, fresh.name)  # a bad or taken name fails before any write
        return fresh

    @property
    def uri(self) -> str:
        return f"file2:{self.folder.absolute() / self.name}.pem"

    def write(self) -> str:
        return self.key.write(self.folder, self.name, public=False)

    def undo(self) -> None:
        with contextlib.suppress(OSError):
            (self.folder / f"{self.name}.pem").unlink()


def _sign_here(project: Project, md: Metadata[Root]) -> bool:
    """Sign root N+1 with the root keys usable here (missing key files are skipped, as an
    offline box is expected to hold them). True when python-tuf accepts the result for both
    the current and the new root; otherwise the root is left unsigned and False is returned."""
    current = newest_root(project.storage).signed
    keys: dict[str, Key] = {}
    for root in (md.signed, current):
        for k in root.roles[Root.type].keyids:
            if key_problem(project, k, root.keys[k]) is None:
                keys[k] = root.keys[k]
    md.signatures.clear()
    project.signers.sign_also(md, keys)
    try:
        verify_rotation(current, md)
    except SecurityError:
        md.signatures.clear()
        return False
    return True


@contextlib.contextmanager
def _signers_restored_on_error(project: Project) -> Iterator[None]:
    """Checks run before any write may have named new key URIs in memory (``export_root``,
    ``set_signer``); if a check fails, forget them so that a later ``save_config`` of the same
    ``Project`` cannot record them."""
    before = dict(project.config.signers)
    try:
        yield
    except BaseException as e:
        if not getattr(e, _COMMITTED, False):  # past the point of no return: keep (see below)
            project.config.signers.clear()
            project.config.signers.update(before)
        raise


def _has_private(key: KeySpec, fresh: _FreshKey | None) -> bool:
    return fresh is not None or key.uri is not None


def _transactionally(
    project: Project,
    fresh: _FreshKey | None,
    work: Callable[[], KeyChange],
    committed: Callable[[], bool],
) -> KeyChange:
    """Write the fresh key, run ``work``; if it fails, remove the key and restore ``ota.toml``
    as it was (nothing recorded on failure) -- unless ``committed()`` says (or cannot rule out)
    that storage already trusts the change: then the key file and its URI are kept (a deleted
    key that the repository trusts can never sign again; a kept unused one is harmless)."""
    saved = (project.root_dir / "ota.toml").read_bytes()
    signers = dict(project.config.signers)
    try:
        if fresh is not None:
            fresh.write()
        return work()
    except BaseException as e:
        if _maybe_committed(committed):
            setattr(e, _COMMITTED, True)
            with contextlib.suppress(Exception):
                project.save_config()  # the URIs storage may now depend on
            raise
        if fresh is not None:
            fresh.undo()
        project.config.signers.clear()
        project.config.signers.update(signers)
        _atomic.write_bytes(project.root_dir / "ota.toml", saved)
        raise


_COMMITTED = "_ota_storage_committed"  # set on an exception raised past the point of no return


def _maybe_committed(committed: Callable[[], bool]) -> bool:
    try:
        return committed()
    except Exception:  # storage unreachable: cannot rule it out
        return True


def _finish_root(
    project: Project,
    md: Metadata[Root],
    out: Path | None,
    actions: list[str],
    new_keyid: str,
    *,
    signed_here: bool,
    bridge: bool = True,
) -> KeyChange:
    project.save_config()  # the new keys' URIs must survive a ceremony that takes days
    version = md.signed.version
    if signed_here:
        published = publish_root(project, md, bridge=bridge)
        actions.append(f"published root {version}; re-signed {', '.join(published.resigned)}")
        return KeyChange(actions, version, True, None, new_keyid)
    path = out or project.root_dir / f"root-{version}.unsigned.json"
    write_root_file(md, path)
    actions.append(
        f"wrote unsigned root {version} to {path}: the root keys are not all here; "
        "sign it with `ota root sign` on the offline machine, then `ota root publish`"
    )
    return KeyChange(actions, version, False, path, new_keyid)


def rotate(
    project: Project,
    role: str,
    new_key: KeySpec | None = None,
    *,
    out: Path | None = None,
    bridge: bool = True,
) -> KeyChange:
    """Replace every key of ``role`` with ``new_key`` (generated when None).

    All or nothing: every key the rotation signs with is checked first; the new key file and
    its URI in ``ota.toml`` are written only when the rotation can complete (published here, or
    an unsigned root written for the offline ceremony), and removed again if it fails before
    storage trusts the new key (after that, e.g. a failed local write of root.json, they are
    kept: deleting a key the repository trusts would freeze the role).

    Raises:
        InputError: unknown role.
        MissingKeys (ConfigError): a key needed here is not usable (e.g. the offline targets
            key for ``bins``, a public-only new key for an online role); nothing was written.
        SecurityError / ConflictError: see :func:`~ota.repository._rootceremony.publish_root`.
    """
    if role not in ROTATABLE:
        raise InputError(f"cannot rotate {role!r}", remedy=f"use one of {', '.join(ROTATABLE)}")
    with _signers_restored_on_error(project):
        return _rotate(project, role, new_key, out, bridge)


def _rotate(
    project: Project, role: str, new_key: KeySpec | None, out: Path | None, bridge: bool = True
) -> KeyChange:
    fresh: _FreshKey | None = None
    if new_key is None:
        fresh = _FreshKey.make(project, role)
        key = KeySpec(fresh.key.public, fresh.uri)
    else:
        key = new_key
    what = f"ota key rotate {role}"
    if role == "bins":
        extra = [] if _has_private(key, fresh) else [_public_only(key, "bins")]
        require_keys(project, what, roles=[Targets.type], extra=extra, logged=False)

        def bins() -> KeyChange:
            if key.uri:
                project.set_signer(key.keyid, key.uri)
            project.save_config()
            return KeyChange(rotate_bins(project, key), new_keyid=key.keyid)

        def bins_committed() -> bool:
            txn = Transaction.begin(project.storage, project.signers, project.expiry())
            return key.keyid in txn.targets().signed.get_delegated_role(RELEASES_ROLE).keyids

        return _transactionally(project, fresh, bins, bins_committed)
    current = newest_root(project.storage).signed
    old = list(current.roles[role].keyids)
    change = RootChange(
        add=[(role, key)], remove=[(role, k) for k in old if k != key.keyid], thresholds={role: 1}
    )
    md = export_root(project, change)  # records the URI in memory only
    signed_here = _sign_here(project, md)
    if signed_here:  # publish_root re-signs role, snapshot and timestamp here
        extra = [] if _has_private(key, fresh) else [_public_only(key, role)]
        head = [r for r in ("snapshot", "timestamp") if r != role]
        require_keys(project, what, roles=head, extra=extra, logged=False, head=False)
    actions = [f"{role}: {', '.join(k[:16] for k in old)} -> {key.keyid[:16]}"]
    return _transactionally(
        project,
        fresh,
        lambda: _finish_root(
            project, md, out, actions, key.keyid, signed_here=signed_here, bridge=bridge
        ),
        lambda: key.keyid in newest_root(project.storage).signed.roles[role].keyids,
    )


def _public_only(key: KeySpec, role: str) -> str:
    return (
        f"new {role} key {key.keyid[:16]}: only its public key was given, and {role} must be "
        "signed on this machine (pass file2:/envvar:/awskms: URI of the private key, or keep "
        "NAME.pem beside NAME.pub.pem as `ota key generate` writes them)"
    )


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
        from ota.repository._layout import replace_online_keys

        delegators = [r for r in txn.online_roles() if r in (RELEASES_ROLE, "archive.dir")]
        for r in delegators:  # ADR 0010: every delegation below releases (either layout)
            replace_online_keys(txn.edit(r), old, key.key)
        bins = txn.online_roles()[1:]
        for b in bins:
            txn.resign(b)
        return [
            f"bins: {', '.join(k[:16] for k in old)} -> {key.keyid[:16]}; "
            f"re-signed releases and {len(bins)} bins"
        ]

    return run(project.storage, project.signers, project.expiry(), change)


@dataclass(frozen=True)
class KeyRow:
    """One listed key. ``uri_configured``: ``ota.toml`` names its private half;
    ``signs_here``: that private half is actually usable on this machine now (a configured
    file moved to an offline box is not); ``problem``: why not, when configured."""

    keyid: str
    kind: str  # "tuf" or "model-signing"
    roles: tuple[str, ...]
    uri_configured: bool
    signs_here: bool = False
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"roles": list(self.roles)}

    @property
    def where(self) -> str:
        """Human summary of :attr:`signs_here`."""
        if self.signs_here:
            return "signs here"
        if self.uri_configured:
            return "configured, not usable here"
        return "not on this machine"


def list_keys(project: Project, *, check: bool = True) -> list[KeyRow]:
    """Every key the repository lists, where, and whether this machine can sign with it
    (``check``: load each configured signer to find out; writes nothing)."""
    from ota.repository._preflight import release_key_problem
    from ota.repository._trust import release_fingerprint

    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    root = txn.root().signed
    where: dict[str, list[str]] = {}
    public: dict[str, Key] = dict(root.keys)
    for role, r in root.roles.items():
        for k in r.keyids:
            where.setdefault(k, []).append(role)
    top = txn.targets().signed
    for name in [*txn.team_roles(), RELEASES_ROLE]:
        for k in top.get_delegated_role(name).keyids:
            where.setdefault(k, []).append("bins" if name == RELEASES_ROLE else f"team:{name}")
            public.setdefault(k, top.get_key(k))
    rows = []
    for k, v in where.items():
        configured = k in project.config.signers
        problem = key_problem(project, k, public[k]) if check and configured else None
        rows.append(KeyRow(k, "tuf", tuple(v), configured, configured and problem is None,
                           problem))  # fmt: skip
    try:
        ours = release_fingerprint(project) if check else None
    except ConfigError:
        ours = None
    for e in read_signers(project, txn):
        mine = e.keyid == ours
        problem = release_key_problem(project) if mine else None
        rows.append(KeyRow(e.keyid, "model-signing", e.models, mine, mine and problem is None,
                           problem))  # fmt: skip
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
    with _signers_restored_on_error(project):
        return _revoke(project, resolve_keyid(project, keyid), replacement,
                       signing_replacement, force, out)  # fmt: skip


def _revoke(
    project: Project,
    keyid: str,
    replacement: KeySpec | None,
    signing_replacement: bytes | None,
    force: bool,
    out: Path | None,
) -> KeyChange:
    rows = [r for r in list_keys(project) if r.keyid == keyid]
    signing = any(row.kind == "model-signing" for row in rows)
    teams = [r[len("team:") :] for row in rows for r in row.roles if r.startswith("team:")]
    bins = any(row.kind == "tuf" and "bins" in row.roles for row in rows)
    top_level = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
    root_roles = [r for row in rows for r in row.roles if r in top_level]
    # 1. Decide everything and check every key before anything is written (issue 12).
    if bins and replacement is None:
        raise InputError("the bins key needs a --replacement key")
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    for team in teams:
        r = txn.targets().signed.get_delegated_role(team)
        if len(r.keyids) - 1 + (replacement is not None) < r.threshold and not force:
            raise InputError(
                f"revoking {keyid[:16]} leaves {team} with {len(r.keyids) - 1} keys, "
                f"threshold {r.threshold}",
                remedy="pass --replacement KEY, or --force to freeze the team's releases",
            )
    if signing:
        _check_signing_orphans(project, txn, keyid, signing_replacement, force)
    problems: list[str] = []
    if bins and replacement is not None and replacement.uri is None:
        problems.append(_public_only(replacement, "bins"))
    if replacement is not None and replacement.uri:
        project.set_signer(replacement.keyid, replacement.uri)  # in memory until saved
    root_md: Metadata[Root] | None = None
    signed_here = False
    if root_roles:
        root_md = _root_without(project, keyid, root_roles, replacement)
        signed_here = _sign_here(project, root_md)
        if signed_here:
            problems += _new_root_problems(project, root_md.signed, keyid)
    needs_targets = signing or bool(teams) or bins
    if needs_targets or problems:
        roles = [Targets.type] if needs_targets else []
        require_keys(project, f"ota key revoke {keyid[:16]}", roles=roles, extra=problems,
                     logged=False, head=needs_targets)  # fmt: skip

    # 2. Do it; ota.toml is restored if a step fails.
    def work() -> KeyChange:
        actions: list[str] = []
        if signing:
            actions.append(_revoke_signing_key(project, keyid, signing_replacement, force))
        for team in teams:
            revoke_team_key(project, team, keyid, replacement=replacement, force=force)
            actions.append(f"removed {keyid[:16]} from team {team}")
        if bins and replacement is not None:
            actions.extend(rotate_bins(project, replacement, only=keyid))
        result = KeyChange(actions)
        if root_md is not None:
            actions.append(f"removed {keyid[:16]} from root roles {', '.join(root_roles)}")
            new_keyid = replacement.keyid if replacement is not None else ""
            result = _finish_root(
                project, root_md, out, actions, new_keyid, signed_here=signed_here
            )
        project.set_signer(keyid, None)
        project.save_config()
        return result

    def changed() -> bool:  # a step already committed: keep the replacement's URI
        now = [(r.kind, r.roles) for r in list_keys(project, check=False) if r.keyid == keyid]
        return now != [(r.kind, r.roles) for r in rows]

    return _transactionally(project, None, work, changed)


def _root_without(
    project: Project, keyid: str, roles: list[str], replacement: KeySpec | None
) -> Metadata[Root]:
    """Root N+1 without ``keyid`` in ``roles`` (with ``replacement`` where a role would fall
    under its threshold). In memory only.

    Raises:
        InputError: a role would fall under its threshold and there is no replacement.
    """
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
    return export_root(project, RootChange(add=add, remove=[(role, keyid) for role in roles]))


def _new_root_problems(project: Project, new: Root, revoked: str) -> list[str]:
    """Keys missing here to re-sign the online top-level roles under root N+1."""
    problems = []
    for role in (Targets.type, Snapshot.type, Timestamp.type):
        r = new.roles[role]
        found = {k: key_problem(project, k, new.keys[k]) for k in r.keyids if k != revoked}
        if sum(p is None for p in found.values()) < r.threshold:
            problems += [f"{role} under root {new.version}: {p}" for p in found.values() if p]
    return problems


def _check_signing_orphans(
    project: Project, txn: Transaction, fingerprint: str, replacement: bytes | None, force: bool
) -> None:
    entries = read_signers(project, txn)
    kept = [e for e in entries if e.keyid != fingerprint]
    globs = {g for e in entries if e.keyid == fingerprint for g in e.models}
    orphaned = sorted(g for g in globs if not any(g in e.models for e in kept))
    if orphaned and replacement is None and not force:
        raise InputError(
            f"revoking model-signing key {fingerprint[:16]} leaves {', '.join(orphaned)} "
            "without a signer",
            remedy="pass --replacement-signing PUB.pem, or --force",
        )


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
        for role in txn.online_roles():  # releases and every role below it (ADR 0010)
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
