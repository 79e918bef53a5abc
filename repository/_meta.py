"""Metadata basics shared by the transaction and key management: names, lifetimes, parsing,
and :class:`SignerSet` (which keys this machine can sign with).

Nothing here decides trust: signatures are checked by python-tuf (``verify_delegate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from securesystemslib.signer import Signer
from tuf.api.metadata import Key, Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from ota.errors import ConfigError, SecurityError
from ota.repository._storage import NotFound, Storage

HEAD_KEY = "metadata/timestamp.json"
RELEASES_ROLE = "releases"
BINS_PREFIX = "bins"  # the hash bins of the layout before ADR 0010 (kept readable, migrated)
# ADR 0010: one online role per model, an archive of older releases split by path-hash prefix,
# and a small role for the audit-log anchor. Every name holds a dot, which no team name can.
MODEL_ROLE_PREFIX = "model."
ARCHIVE_ROLE = "archive.dir"
ARCHIVE_SEGMENT_PREFIX = "archive.h"  # + the hex prefix of sha256(target path) it holds
AUDIT_ROLE = "audit.log"
ARCHIVE_SEGMENT_CAP = 1024  # targets (about 1 MB, python-tuf reads 5 MB): split in 16 beyond
TOP_LEVEL_ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
MAX_METADATA_BYTES = 16 * 1024 * 1024

T = TypeVar("T")
SERIALIZER = JSONSerializer(compact=True)


@dataclass(frozen=True)
class Expiry:
    """Lifetimes of each role, in days."""

    root: float = 365
    targets: float = 365
    bins: float = 30
    snapshot: float = 7
    timestamp: float = 1
    team: float = 365

    def for_role(self, role: str) -> timedelta:
        """Lifetime of a top-level role; any other name gets the online (bins) lifetime (the
        model roles, the archive and the audit role of ADR 0010 included)."""
        days = {
            Root.type: self.root,
            Targets.type: self.targets,
            Snapshot.type: self.snapshot,
            Timestamp.type: self.timestamp,
        }.get(role, self.bins)
        return timedelta(days=days)


def model_role(name: str) -> str:
    """The online role that holds a model's index and live releases (ADR 0010)."""
    return f"{MODEL_ROLE_PREFIX}{name}"


def is_online_role(role: str) -> bool:
    """Whether ``role`` is one of the roles the online key signs (the ``releases`` role and
    everything below it: model roles, archive, audit, and the hash bins of the old layout)."""
    return (
        role == RELEASES_ROLE
        or role.startswith((MODEL_ROLE_PREFIX, "archive.", "audit."))
        or role.startswith(BINS_PREFIX + "-")
    )


def md_key(role: str, version: int) -> str:
    return f"metadata/{version}.{role}.json"


def now() -> datetime:
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
        latest = parse_metadata(raw, Root, "root")
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

    def forget(self, keyid: str) -> None:
        """Drop a loaded signer (its key was revoked or rotated away)."""
        self._signers.pop(keyid, None)

    def sign_also(self, md: Metadata[Any], keys: Mapping[str, Key]) -> None:
        """Add signatures of every held key among ``keys`` that has not signed ``md`` yet.

        Counts nothing: callers verify the result with python-tuf's ``verify_delegate``.
        """
        for keyid, pub in keys.items():
            if keyid not in md.signatures and (signer := self._signer(keyid, pub)) is not None:
                md.sign(signer, append=True)


def parse_metadata(raw: bytes, typ: type[T], what: str) -> Metadata[Any]:
    try:
        md = Metadata[Any].from_bytes(raw)
    except Exception as e:  # tuf raises DeserializationError and friends
        raise SecurityError(f"stored {what} metadata does not parse: {e}") from e
    if not isinstance(md.signed, cast(type, typ)):
        raise SecurityError(f"stored {what} metadata has the wrong type")
    return md


__all__ = [
    "ARCHIVE_ROLE",
    "ARCHIVE_SEGMENT_CAP",
    "ARCHIVE_SEGMENT_PREFIX",
    "AUDIT_ROLE",
    "BINS_PREFIX",
    "HEAD_KEY",
    "MODEL_ROLE_PREFIX",
    "MAX_METADATA_BYTES",
    "RELEASES_ROLE",
    "SERIALIZER",
    "TOP_LEVEL_ROLES",
    "Expiry",
    "SignerSet",
    "is_online_role",
    "md_key",
    "model_role",
    "newest_root",
    "now",
    "parse_metadata",
]
