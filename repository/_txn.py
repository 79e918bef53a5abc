"""The publish transaction over TUF metadata in a :class:`Storage`.

Layout (consistent snapshots, TUF spec 5.x): ``metadata/<v>.root.json``,
``metadata/<v>.<role>.json`` for targets, the hash bins and snapshot, and
``metadata/timestamp.json``. The timestamp is the *head*: the single mutable object, replaced
with a conditional write (``If-Match``) as the very last step. Every other metadata file is
immutable and created with ``If-None-Match``; if a version already exists (written by a
concurrent or crashed publisher and never committed), the next free version is taken, so an
orphan is never overwritten and versions only grow.

Invariant: a reader who starts from ``timestamp.json`` sees either the state before or the state
after a transaction, never a mix; a transaction that dies at any point leaves the published state
as it was (only unreferenced files behind, which ``ota gc`` removes).

This module decides nothing about releases; it edits roles on request and commits them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from securesystemslib.signer import Signer
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
from tuf.api.serialization.json import JSONSerializer

from ota.errors import ConfigError, ConflictError, SecurityError
from ota.repository._storage import NotFound, PreconditionFailed, Storage

HEAD_KEY = "metadata/timestamp.json"
MAX_METADATA_BYTES = 16 * 1024 * 1024
_MAX_VERSION_SKIPS = 64

T = TypeVar("T")
_SERIALIZER = JSONSerializer(compact=True)


@dataclass(frozen=True)
class Expiry:
    """Lifetimes of each role, in days."""

    root: float = 365
    targets: float = 365
    bins: float = 30
    snapshot: float = 7
    timestamp: float = 1

    def for_role(self, role: str) -> timedelta:
        days = {
            Root.type: self.root,
            Targets.type: self.targets,
            Snapshot.type: self.snapshot,
            Timestamp.type: self.timestamp,
        }.get(role, self.bins)
        return timedelta(days=days)


def md_key(role: str, version: int) -> str:
    return f"metadata/{version}.{role}.json"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def newest_root(store: Storage) -> Metadata[Root]:
    """The newest root in ``store``, found by probing ``<v>.root.json`` upwards.

    Raises:
        ConfigError: there is no root at all.
    """
    version = 1
    latest: Metadata[Root] | None = None
    while True:
        try:
            raw, _ = store.get(md_key(Root.type, version), max_bytes=MAX_METADATA_BYTES)
        except NotFound:
            break
        latest = _parse(raw, Root, "root")
        version += 1
    if latest is None:
        raise ConfigError(f"no root metadata at {store.url}")
    return latest


class SignerSet:
    """Signers by key id. A role is signed by every signer it lists that we hold."""

    def __init__(self, signers: Mapping[str, Signer]) -> None:
        self._signers = dict(signers)

    def _signer(self, keyid: str, public: Key) -> Signer | None:
        return self._signers.get(keyid)

    def sign(self, md: Metadata[Any], keys: Mapping[str, Key], threshold: int, role: str) -> None:
        """Sign ``md`` with every held key among the role's ``keys`` (key id -> public key).

        Raises:
            ConfigError: fewer than ``threshold`` of the role's keys are available here.
        """
        md.signatures.clear()
        held = [s for k, pub in keys.items() if (s := self._signer(k, pub)) is not None]
        if len(held) < threshold:
            raise ConfigError(
                f"cannot sign {role}: {len(held)} of its keys available, threshold {threshold}",
                remedy=f"configure the {role} key URI in ota.toml (or sign offline and import)",
            )
        for signer in held:
            md.sign(signer, append=True)


class Transaction:
    """One read-modify-commit of the repository metadata.

    Create with :meth:`begin`; read roles with :meth:`targets`; edit with :meth:`edit`;
    publish with :meth:`commit`. A transaction is single-use.
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
        snapshot = _parse(
            store.get(md_key(Snapshot.type, snap_version), max_bytes=MAX_METADATA_BYTES)[0],
            Snapshot,
            "snapshot",
        )
        return cls(store, signers, expiry, etag, timestamp, snapshot)

    # -- reading ------------------------------------------------------------------------------

    def root(self) -> Metadata[Root]:
        """The newest root (found by probing ``<v+1>.root.json``), read once per transaction."""
        if self._root is None:
            self._root = newest_root(self._store)
        return self._root

    def targets(self, role: str = Targets.type) -> Metadata[Targets]:
        """The committed (or, once edited, the pending) metadata of a targets role."""
        if role not in self._loaded:
            meta = self.snapshot.signed.meta.get(f"{role}.json")
            if meta is None:
                raise SecurityError(f"snapshot does not list role {role}")
            raw, _ = self._store.get(md_key(role, meta.version), max_bytes=MAX_METADATA_BYTES)
            self._loaded[role] = _parse(raw, Targets, role)
        return self._loaded[role]

    def succinct(self) -> SuccinctRoles:
        delegations = self.targets().signed.delegations
        if delegations is None or delegations.succinct_roles is None:
            raise SecurityError("targets role has no succinct hash-bin delegation")
        return delegations.succinct_roles

    def bin_for(self, path: str) -> str:
        """Name of the hash-bin role responsible for a target path."""
        return self.succinct().get_role_for_target(path)

    # -- editing ------------------------------------------------------------------------------

    def edit(self, role: str) -> Targets:
        """Return the role's signed part for editing; it is re-signed at commit."""
        md = self.targets(role)
        self._dirty.add(role)
        return md.signed

    @property
    def changed(self) -> bool:
        return bool(self._dirty)

    def commit(self) -> int:
        """Sign and write every edited role, then snapshot, then the timestamp (the head).

        Returns:
            The new snapshot version.

        Raises:
            ConflictError: another publisher committed first (nothing of ours is visible).
            ConfigError: a needed signing key is not available.
        """
        now = _now()
        snap = self.snapshot.signed
        for role in sorted(self._dirty):
            md = self._loaded[role]
            keys, threshold = self._role_keys(role)
            md.signed.expires = now + self._expiry.for_role(role)
            version = self._write_versioned(md, role, keys, threshold)
            snap.meta[f"{role}.json"] = MetaFile(version=version)
        snap.expires = now + self._expiry.for_role(Snapshot.type)
        snap_keys, snap_threshold = self._role_keys(Snapshot.type)
        snap_version = self._write_versioned(
            self.snapshot, Snapshot.type, snap_keys, snap_threshold
        )
        ts = self.timestamp.signed
        ts.version += 1
        ts.expires = now + self._expiry.for_role(Timestamp.type)
        ts.snapshot_meta = MetaFile(version=snap_version)
        ts_keys, ts_threshold = self._role_keys(Timestamp.type)
        self._signers.sign(self.timestamp, ts_keys, ts_threshold, Timestamp.type)
        head = self.timestamp.to_bytes(_SERIALIZER)
        try:
            self._store.put(HEAD_KEY, head, if_match=self._head_etag)
        except PreconditionFailed as e:
            if not self._is_ours(HEAD_KEY, head):  # a retried write whose first reply was lost
                raise ConflictError("another publisher committed first") from e
        self._dirty.clear()
        return snap_version

    def _is_ours(self, key: str, data: bytes) -> bool:
        """Whether ``key`` holds exactly ``data`` (signatures make a collision impossible)."""
        try:
            return self._store.get(key, max_bytes=MAX_METADATA_BYTES)[0] == data
        except NotFound:
            return False

    def _role_keys(self, role: str) -> tuple[dict[str, Key], int]:
        """Public keys (by key id) and threshold of a role, from root or the delegation."""
        if role in (Root.type, Targets.type, Snapshot.type, Timestamp.type):
            root = self.root().signed
            r = root.roles[role]
            return {k: root.keys[k] for k in r.keyids}, r.threshold
        delegations = self.targets().signed.delegations
        succinct = self.succinct()
        if delegations is None or delegations.keys is None or not succinct.is_delegated_role(role):
            raise SecurityError(f"unknown delegated role {role}")
        return {k: delegations.keys[k] for k in succinct.keyids}, succinct.threshold

    def _write_versioned(
        self, md: Metadata[Any], role: str, keys: Mapping[str, Key], threshold: int
    ) -> int:
        version: int = md.signed.version + 1
        for _ in range(_MAX_VERSION_SKIPS):
            md.signed.version = version
            self._signers.sign(md, keys, threshold, role)
            data = md.to_bytes(_SERIALIZER)
            try:
                self._store.put(md_key(role, version), data, if_none_match=True)
                return version
            except PreconditionFailed:
                if self._is_ours(md_key(role, version), data):
                    return version  # our own write, retried after a lost reply
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


def _parse(raw: bytes, typ: type[T], what: str) -> Metadata[Any]:
    try:
        md = Metadata[Any].from_bytes(raw)
    except Exception as e:  # tuf raises DeserializationError and friends
        raise SecurityError(f"stored {what} metadata does not parse: {e}") from e
    if not isinstance(md.signed, cast(type, typ)):
        raise SecurityError(f"stored {what} metadata has the wrong type")
    return md


__all__ = [
    "HEAD_KEY",
    "Expiry",
    "SignerSet",
    "Transaction",
    "UnsignedMetadataError",
    "md_key",
    "run",
]
