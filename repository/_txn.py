"""The publish transaction over TUF metadata in a :class:`Storage`.

Layout (consistent snapshots, TUF spec 5.x): ``metadata/<v>.root.json``,
``metadata/<v>.<role>.json`` for targets, the team roles, the ``releases`` role, the hash bins
and snapshot, and ``metadata/timestamp.json``. The timestamp is the *head*: the single mutable
object, replaced with a conditional write (``If-Match``) as the very last step. Every other
metadata file is immutable and created with ``If-None-Match``; if a version already exists
(written by a concurrent or crashed publisher and never committed), the next free version is
taken, so an orphan is never overwritten and versions only grow.

Invariant: a reader who starts from ``timestamp.json`` sees either the state before or the state
after a transaction, never a mix; a transaction that dies at any point leaves the published state
as it was (only unreferenced files behind, which ``ota gc`` removes).

Delegation tree (ADR 0004, ADR 0010, ``ota.repository._layout``): top-level ``targets``
(offline key) delegates named roles, team roles first (``releases/<glob>/*``, terminating, the
team's keys), then the catch-all ``releases`` role (``releases/*/*``, ``index/*``, ``audit/*``,
online key), which delegates a role per model, the audit role and the archive (or, in a
repository not migrated yet, the succinct hash bins ``bins-*`` of ADR 0002).
:meth:`Transaction.find` and :meth:`Transaction.bin_for` walk this tree exactly as python-tuf's
client does (pre-order, depth first, delegations in order, a terminating match ends the walk).

This module decides nothing about releases; it edits roles on request and commits them. Every
threshold question is answered by python-tuf (``verify_delegate``), never here.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Key,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    Targets,
    Timestamp,
)

from ota.errors import ConfigError, ConflictError, SecurityError
from ota.repository._meta import (
    ARCHIVE_ROLE,
    BINS_PREFIX,
    HEAD_KEY,
    MAX_METADATA_BYTES,
    RELEASES_ROLE,
    TOP_LEVEL_ROLES,
    Expiry,
    SignerSet,
    is_online_role,
    md_key,
    newest_root,
)
from ota.repository._meta import SERIALIZER as _SERIALIZER
from ota.repository._meta import now as _now
from ota.repository._meta import parse_metadata as _parse
from ota.repository._retired import lengthless, may_forget
from ota.repository._storage import NotFound, PreconditionFailed, Storage

_MAX_VERSION_SKIPS = 64
T = TypeVar("T")


class Transaction:
    """One read-modify-commit of the repository metadata.

    Create with :meth:`begin`; read roles with :meth:`targets`; edit with :meth:`edit` (or
    :meth:`resign` to re-sign unchanged); publish with :meth:`commit`. A transaction is
    single-use. Roles are signed with the keys their delegator lists *in this transaction*
    (an edited delegation applies to the roles re-signed in the same commit).
    """

    def __init__(
        self,
        store: Storage,
        signers: SignerSet,
        expiry: Expiry,
        head_etag: str,
        timestamp: Metadata[Timestamp],
        snapshot: Metadata[Snapshot],
    ) -> None:
        self._store = store
        self._signers = signers
        self._expiry = expiry
        self._head_etag = head_etag
        self.timestamp = timestamp
        self.snapshot = snapshot
        self._loaded: dict[str, Metadata[Targets]] = {}
        self._dirty: set[str] = set()
        self._root: Metadata[Root] | None = None
        self._snapshot_due = False
        self._timestamp_due = False
        self._cosign: list[Root] = []
        self._new: set[str] = set()  # delegated roles not yet in the snapshot
        # roles no delegation reaches any more (ADR 0010): signed with the keys that last
        # delegated them, listed in the snapshot without a length (no client fetches them)
        self._retired: dict[str, tuple[dict[str, Key], int]] = {}
        self._snapshot_raw: bytes | None = None  # the snapshot as read (its signatures)

    @classmethod
    def begin(cls, store: Storage, signers: SignerSet, expiry: Expiry) -> Transaction:
        """Read the head and the snapshot it names.

        Raises:
            ConfigError: the storage holds no repository (run ``ota init``).
            SecurityError: the stored metadata does not parse.
        """
        try:
            raw, etag = store.get(HEAD_KEY, max_bytes=MAX_METADATA_BYTES)
        except NotFound as e:
            raise ConfigError(f"no repository at {store.url}", remedy="run `ota init` first") from e
        timestamp = _parse(raw, Timestamp, HEAD_KEY)
        snap_version = timestamp.signed.snapshot_meta.version
        snap_raw = store.get(md_key(Snapshot.type, snap_version), max_bytes=MAX_METADATA_BYTES)[0]
        snapshot = _parse(snap_raw, Snapshot, "snapshot")
        txn = cls(store, signers, expiry, etag, timestamp, snapshot)
        txn._snapshot_raw = snap_raw
        return txn

    # -- reading ------------------------------------------------------------------------------

    def root(self) -> Metadata[Root]:
        """The newest root (found by probing ``<v+1>.root.json``), read once per transaction."""
        if self._root is None:
            self._root = newest_root(self._store)
        return self._root

    def targets(self, role: str = Targets.type) -> Metadata[Targets]:
        """The committed (or, once edited, the pending) metadata of a targets role.

        A delegated role that the snapshot does not list yet (a team role before its first
        release) reads as empty: its first commit writes version 1.

        Raises:
            SecurityError: the role is neither listed in the snapshot nor delegated.
        """
        if role not in self._loaded:
            meta = self.snapshot.signed.meta.get(f"{role}.json")
            if meta is None:
                if role == Targets.type or self._delegator(role) is None:
                    raise SecurityError(f"snapshot does not list role {role}")
                self._loaded[role] = Metadata(Targets(version=1, expires=_now()))
                self._new.add(role)
                return self._loaded[role]
            raw, _ = self._store.get(md_key(role, meta.version), max_bytes=MAX_METADATA_BYTES)
            self._loaded[role] = _parse(raw, Targets, role)
        return self._loaded[role]

    def succinct(self) -> SuccinctRoles:
        """The hash-bin delegation of the ``releases`` role (the layout before ADR 0010).

        Raises:
            SecurityError: the repository has no ``releases`` role with hash bins.
        """
        delegations = self.targets(RELEASES_ROLE).signed.delegations
        if delegations is None or delegations.succinct_roles is None:
            raise SecurityError("the releases role has no succinct hash-bin delegation")
        return delegations.succinct_roles

    def legacy_layout(self) -> bool:
        """Whether ``releases`` still delegates the hash bins of ADR 0002 (not migrated)."""
        delegations = self.targets(RELEASES_ROLE).signed.delegations
        return delegations is not None and delegations.succinct_roles is not None

    def team_roles(self) -> list[str]:
        """Names of the team roles, in delegation order (the order devices consult them)."""
        delegations = self.targets().signed.delegations
        roles = delegations.roles if delegations is not None else None
        return [name for name in (roles or {}) if name != RELEASES_ROLE]

    def online_roles(self) -> list[str]:
        """``releases`` and every role delegated below it, in delegation order (pending
        delegations of this transaction included): what the online key signs. This is the
        list of every online targets role of the repository, for re-signing (key rotation,
        refresh, offline media); team roles and ``targets`` are in :meth:`team_roles`."""
        out = [RELEASES_ROLE]
        queue = [RELEASES_ROLE]
        while queue:
            delegations = self.targets(queue.pop(0)).signed.delegations
            if delegations is None:
                continue
            if delegations.succinct_roles is not None:
                out += delegations.succinct_roles.get_roles()
                continue
            for name in delegations.roles or {}:
                out.append(name)
                queue.append(name)
        return out

    def all_targets_roles(self) -> list[str]:
        """Every targets role a client can reach, in delegation order: ``targets``, the team
        roles, ``releases`` and everything below it (for tools that copy or re-sign the whole
        tree, e.g. offline media). Retired roles (listed in the snapshot, delegated by nobody:
        ADR 0010) are not among them."""
        return [Targets.type, *self.team_roles(), *self.online_roles()]

    def release_roles(self) -> list[str]:
        """Every role that may hold release targets: the team roles, then the online roles
        below ``releases`` (model roles, archive segments; or the hash bins)."""
        return [*self.team_roles(), *self.online_roles()[1:]]

    def _walk(self, path: str) -> tuple[str | None, str]:
        """python-tuf's pre-order depth-first search for ``path`` (``Updater._preorder_depth_
        first_walk``): (the role that lists it or None, the first role visited that delegates
        ``path`` to nobody, where a new target is placed)."""
        stack = [Targets.type]
        visited: set[str] = set()
        place: str | None = None
        while stack and len(visited) <= 64:
            role = stack.pop()
            if role in visited:
                continue
            signed = self.targets(role).signed
            if path in signed.targets:
                return role, role
            visited.add(role)
            children: list[str] = []
            if signed.delegations is not None:
                for child, terminating in signed.delegations.get_roles_for_target(path):
                    children.append(child)
                    if terminating:
                        stack.clear()
                        break
            if not children and place is None:
                place = role
            stack.extend(reversed(children))
        return None, place or Targets.type

    def find(self, path: str) -> str | None:
        """The role a TUF client finds ``path`` in, or None (not published)."""
        return self._walk(path)[0]

    def bin_for(self, path: str) -> str:
        """The role that holds ``path``, or where a TUF client would look for it first: the
        first role on python-tuf's walk that delegates it no further (a team role, a model
        role, the audit role, a hash bin of a repository not migrated yet). A release path of
        a model without a model role places in the archive, an index path in ``releases``:
        callers create the model role first (:func:`ota.repository._index.ensure_model_role`).
        """
        found, place = self._walk(path)
        return found or place

    # -- editing ------------------------------------------------------------------------------

    def edit(self, role: str) -> Targets:
        """Return the role's signed part for editing; it is re-signed at commit."""
        md = self.targets(role)
        self._dirty.add(role)
        return md.signed

    def resign(self, role: str) -> None:
        """Re-sign ``role`` (any targets role, ``snapshot`` or ``timestamp``) unchanged."""
        if role == Snapshot.type:
            self._snapshot_due = True
        elif role == Timestamp.type:
            self._timestamp_due = True
        else:
            self.edit(role)

    def retire(self, role: str, version: int) -> None:
        """Write ``role`` once more, empty, at ``version`` (or the next free one), signed by the
        keys that delegate it *now*: call before the delegation is removed. Its snapshot entry
        then carries no length (python-tuf never fetches an undelegated role, and entries that
        differ only in their names compress to almost nothing). A role first created in this
        transaction is simply dropped (no client ever saw it)."""
        if role in self._new:
            self._loaded.pop(role, None)
            self._dirty.discard(role)
            self._new.discard(role)
            return
        self._retired[role] = self.role_keys(role)
        md = self.targets(role)
        md.signed.targets = {}
        md.signed.delegations = None
        md.signed.version = max(md.signed.version, version - 1)
        self._dirty.add(role)

    def cosign_with(self, root: Root) -> None:
        """Also sign top-level roles with the keys ``root`` lists (a root rotation in flight).

        The commit then checks with python-tuf that each top-level role it writes verifies
        under ``root`` as well as under the stored newest root, so clients on either side of
        the rotation accept it.
        """
        self._cosign.append(root)

    @property
    def changed(self) -> bool:
        return bool(self._dirty) or self._snapshot_due or self._timestamp_due

    def commit(self) -> int:
        """Sign and write every edited role, then snapshot, then the timestamp (the head).

        The snapshot is rewritten when a role changed or :meth:`resign` asked for it; the
        timestamp always is.

        Returns:
            The snapshot version the new head names.

        Raises:
            ConflictError: another publisher committed first (nothing of ours is visible).
            ConfigError: a needed signing key is not available.
        """
        now = _now()
        snap = self.snapshot.signed
        self._write_new_delegations()
        if self._dirty or self._snapshot_due:
            self._forget_retired()
            for role in sorted(self._dirty):
                md = self._loaded[role]
                md.signed.expires = now + self.lifetime(role)
                version, length = self._write_versioned(md, role)
                retired = role in self._retired
                snap.meta[f"{role}.json"] = MetaFile(version, None if retired else length)
            snap.expires = now + self.lifetime(Snapshot.type)
            snap_version, written = self._write_versioned(self.snapshot, Snapshot.type)
            snap_length: int | None = written
        else:
            snap_version = snap.version
            old = self.timestamp.signed.snapshot_meta
            snap_length = old.length if old.version == snap_version else None
        ts = self.timestamp.signed
        ts.version += 1
        ts.expires = now + self.lifetime(Timestamp.type)
        # signed lengths: python-tuf reads at most that many bytes of each file (ADR 0002)
        ts.snapshot_meta = MetaFile(version=snap_version, length=snap_length)
        self._sign(self.timestamp, Timestamp.type)
        head = self.timestamp.to_bytes(_SERIALIZER)
        try:
            self._store.put(HEAD_KEY, head, if_match=self._head_etag)
        except PreconditionFailed as e:
            if not self._is_ours(HEAD_KEY, head):  # a retried write whose first reply was lost
                raise ConflictError("another publisher committed first") from e
        self._dirty.clear()
        self._snapshot_due = self._timestamp_due = False
        return snap_version

    def _forget_retired(self) -> None:
        """Drop the snapshot entries of retired roles (no length, delegated by nobody) once no
        snapshot listing them verifies under the newest root: after a snapshot-key rotation
        without a bridge (:mod:`ota.repository._retired`). Otherwise they stay: python-tuf
        refuses a snapshot that drops a role its trusted snapshot lists."""
        names = [n for n in lengthless(self.snapshot.signed) if n not in self._retired]
        if not names or self._snapshot_raw is None:
            return
        as_read = _parse(self._snapshot_raw, Snapshot, "snapshot")
        if not may_forget(self._store, self.root(), as_read):
            return
        reachable = set(self.all_targets_roles())
        for name in names:
            if name not in reachable:
                del self.snapshot.signed.meta[f"{name}.json"]

    def _write_new_delegations(self) -> None:
        """Every role an edited online delegator (``releases``, the archive) delegates is
        written at least once: python-tuf refuses a delegated role the snapshot does not list
        (``RepositoryError``), even while merely walking past it."""
        for delegator in (RELEASES_ROLE, ARCHIVE_ROLE):
            if delegator not in self._dirty:
                continue
            delegations = self._loaded[delegator].signed.delegations
            for name in (delegations.roles or {}) if delegations is not None else {}:
                if f"{name}.json" not in self.snapshot.signed.meta and name not in self._dirty:
                    self.edit(name)

    def lifetime(self, role: str) -> timedelta:
        """How long a new version of ``role`` stays valid (team roles: ``Expiry.team``)."""
        if role in TOP_LEVEL_ROLES or is_online_role(role):
            return self._expiry.for_role(role)
        return timedelta(days=self._expiry.team)

    def _is_ours(self, key: str, data: bytes) -> bool:
        """Whether ``key`` holds exactly ``data`` (signatures make a collision impossible)."""
        try:
            return self._store.get(key, max_bytes=MAX_METADATA_BYTES)[0] == data
        except NotFound:
            return False

    def _delegator(self, role: str) -> Targets | None:
        """The (pending) targets role that delegates ``role``, or None: ``targets``,
        ``releases`` or the archive (the only roles that delegate)."""
        top = self.targets().signed
        with contextlib.suppress(ValueError):
            top.get_delegated_role(role)
            return top
        if role == RELEASES_ROLE or not is_online_role(role):
            return None
        releases = self.targets(RELEASES_ROLE).signed
        with contextlib.suppress(ValueError):
            releases.get_delegated_role(role)
            return releases
        try:
            releases.get_delegated_role(ARCHIVE_ROLE)
        except ValueError:
            return None
        archive = self.targets(ARCHIVE_ROLE).signed
        with contextlib.suppress(ValueError):
            archive.get_delegated_role(role)
            return archive
        return None

    def role_keys(self, role: str) -> tuple[dict[str, Key], int]:
        """Public keys (by key id) and threshold of a role, from root or its delegator.

        Raises:
            SecurityError: ``role`` is not delegated, or names a key its delegator lacks.
        """
        if role in TOP_LEVEL_ROLES:
            root = self.root().signed
            r = root.roles[role]
            return {k: root.keys[k] for k in r.keyids}, r.threshold
        delegator = self._delegator(role)
        if delegator is None:
            raise SecurityError(f"unknown delegated role {role}")
        r = delegator.get_delegated_role(role)
        try:
            return {k: delegator.get_key(k) for k in r.keyids}, r.threshold
        except ValueError as e:
            raise SecurityError(f"delegation of {role} names a missing key: {e}") from e

    _role_keys = role_keys

    def _sign(self, md: Metadata[Any], role: str) -> None:
        keys, threshold = self._retired.get(role) or self.role_keys(role)
        self._signers.sign(md, keys, threshold, role)
        if role not in TOP_LEVEL_ROLES:
            return
        for other in self._cosign:
            r = other.roles[role]
            self._signers.sign_also(md, {k: other.keys[k] for k in r.keyids})
            try:  # python-tuf decides whether the other root accepts it
                other.verify_delegate(role, md.signed_bytes, md.signatures)
            except UnsignedMetadataError as e:
                raise ConfigError(
                    f"cannot sign {role} for root version {other.version}: {e}",
                    remedy=f"configure the new {role} key URI in ota.toml",
                ) from e

    def _write_versioned(self, md: Metadata[Any], role: str) -> tuple[int, int]:
        """Write the next free version of ``role``; return (version, length in bytes)."""
        version: int = 1 if role in self._new else md.signed.version + 1
        for _ in range(_MAX_VERSION_SKIPS):
            md.signed.version = version
            self._sign(md, role)
            data = md.to_bytes(_SERIALIZER)
            try:
                self._store.put(md_key(role, version), data, if_none_match=True)
                return version, len(data)
            except PreconditionFailed:
                if self._is_ours(md_key(role, version), data):
                    return version, len(data)  # our own write, retried after a lost reply
                version += 1  # an orphan of a lost or crashed publish: never overwrite it
        raise ConflictError(f"too many concurrent versions of {role}")


def run(
    store: Storage,
    signers: SignerSet,
    expiry: Expiry,
    change: Callable[[Transaction], T],
    *,
    attempts: int = 32,
) -> T:
    """Run ``change`` in a transaction and commit it, re-running on conflict.

    ``change`` must be a pure function of what it reads through the transaction (it is re-run
    from scratch after a conflict). If it edits nothing, nothing is committed.

    Raises:
        ConflictError: still conflicting after ``attempts`` tries.
        Whatever ``change`` raises.
    """
    delay = 0.01
    for _ in range(attempts):
        txn = Transaction.begin(store, signers, expiry)
        result = change(txn)
        if not txn.changed:
            return result
        try:
            txn.commit()
            return result
        except ConflictError:
            time.sleep(delay * (1 + random.random()))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 1.0)
    raise ConflictError(
        f"gave up after {attempts} conflicting attempts", remedy="retry the command later"
    )


__all__ = [
    "BINS_PREFIX",
    "HEAD_KEY",
    "MAX_METADATA_BYTES",
    "RELEASES_ROLE",
    "TOP_LEVEL_ROLES",
    "Expiry",
    "SignerSet",
    "Transaction",
    "UnsignedMetadataError",
    "md_key",
    "newest_root",
    "run",
]
