"""The root ceremony: export an unsigned root N+1, sign it offline, publish it.

* :func:`export_root` (online machine) derives root N+1 from the newest root: keys added or
  removed per role, thresholds, a new expiry. The file carries no signature.
* :func:`sign_root_file` (offline machine, no project, no storage) adds signatures with private
  keys named by ``file2:``/``envvar:`` URIs. Several signers may sign one file in turn, or each
  their own copy: :func:`publish_root` merges signatures of identical payloads.
* :func:`publish_root` lets python-tuf decide (``Root.verify_delegate``) that root N+1 is signed
  by a threshold of root N's root keys *and* of its own (TUF spec 5.3.4), then writes
  ``metadata/<N+1>.root.json`` and ``metadata/root.json``. When the keys of ``targets``,
  ``snapshot`` or ``timestamp`` change, those roles are first re-signed with the old *and* new
  keys (checked by python-tuf against both roots), so clients on either side of the rotation
  always find valid metadata; after the root is written they are re-signed with the new keys.

Invariant: a root that fails verification, does not chain, or whose new online keys this
machine cannot use is refused before anything is written.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Key, Metadata, Root, Targets
from tuf.api.serialization.json import JSONSerializer

from ota import _atomic
from ota.errors import ConfigError, ConflictError, InputError, SecurityError
from ota.repository._keyspec import KeySpec, parse_key
from ota.repository._storage import PreconditionFailed
from ota.repository._txn import TOP_LEVEL_ROLES, Transaction, md_key, newest_root, run

if TYPE_CHECKING:
    from ota.repository._project import Project

_PRETTY = JSONSerializer(compact=False)
_COMPACT = JSONSerializer(compact=True)
_RESIGNABLE = ("targets", "snapshot", "timestamp")


@dataclass(frozen=True)
class RootChange:
    """Edits for root N+1: keys to add and remove per role, new thresholds, lifetime."""

    add: Sequence[tuple[str, KeySpec]] = ()
    remove: Sequence[tuple[str, str]] = ()
    thresholds: Mapping[str, int] = field(default_factory=dict)
    expires_days: float | None = None


def export_root(project: Project, change: RootChange) -> Metadata[Root]:
    """Root N+1 derived from the newest stored root, without signatures.

    Private key URIs of added keys are recorded in ``ota.toml`` (call ``save_config``).

    Raises:
        InputError: unknown role or key, a threshold above the role's key count, no change.
    """
    current = newest_root(project.storage).signed
    new = copy.deepcopy(current)
    new.version = current.version + 1
    days = change.expires_days if change.expires_days is not None else project.expiry().root
    if days <= 0:
        raise InputError("--expires-days must be positive")
    new.expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)
    try:
        for role, keyid in change.remove:
            new.revoke_key(_full_keyid(new, role, keyid), role)
        for role, spec in change.add:
            new.add_key(spec.key, role)
            if spec.uri:
                project.set_signer(spec.keyid, spec.uri)
    except ValueError as e:
        raise InputError(f"cannot edit root: {e}") from e
    for role, n in change.thresholds.items():
        if role not in new.roles:
            raise InputError(f"unknown root role {role}")
        new.roles[role].threshold = n
    for role, r in new.roles.items():
        if not 1 <= r.threshold <= len(r.keyids):
            raise InputError(
                f"role {role} would have {len(r.keyids)} keys and threshold {r.threshold}"
            )
    return Metadata(new)


def _full_keyid(root: Root, role: str, prefix: str) -> str:
    if role not in root.roles:
        raise ValueError(f"unknown role {role}")
    found = [k for k in root.roles[role].keyids if k.startswith(prefix)]
    if len(found) != 1 or len(prefix) < 8:
        raise ValueError(f"no unique key {prefix!r} in role {role} (give 8+ hex digits)")
    return found[0]


def write_root_file(md: Metadata[Root], path: Path) -> None:
    """Write root metadata (signed or not) as readable JSON for the ceremony."""
    _atomic.write_bytes(path, md.to_bytes(_PRETTY))


def read_root_file(path: Path) -> Metadata[Root]:
    """Raises InputError: unreadable, not TUF metadata, or not a root."""
    try:
        md = Metadata[Root].from_bytes(Path(path).read_bytes())
    except Exception as e:  # tuf raises DeserializationError and friends
        raise InputError(f"{path} is not TUF metadata: {e}") from e
    if not isinstance(md.signed, Root):
        raise InputError(f"{path} is not root metadata")
    return md


@dataclass(frozen=True)
class SignedBy:
    keyid: str
    in_new_root: bool


def sign_root_file(path: Path, uris: Sequence[str], out: Path | None = None) -> list[SignedBy]:
    """Add signatures by the keys named in ``uris`` to the root in ``path`` (standalone).

    A key that root N+1 no longer lists may still sign: its signature counts towards root N's
    threshold, which the rotation must also meet.

    Raises:
        InputError: bad file or key; ConfigError: a key cannot be loaded.
    """
    from ota.signing import load_signer

    md = read_root_file(path)
    done = []
    for uri in uris:
        if not uri.startswith(("file2:", "envvar:")):
            raise InputError(f"{uri}: root keys are signed with file2: or envvar: URIs here")
        spec = parse_key(uri)
        listed = spec.keyid in md.signed.keys
        public: Key = md.signed.keys[spec.keyid] if listed else spec.key
        md.sign(load_signer(uri, public), append=True)
        done.append(SignedBy(spec.keyid, listed))
    write_root_file(md, out or path)
    return done


def merge_signatures(files: Iterable[Path]) -> Metadata[Root]:
    """One root carrying every signature of ``files``, which must share one signed payload.

    Raises:
        InputError: no file, or files with different payloads.
    """
    merged: Metadata[Root] | None = None
    for f in files:
        md = read_root_file(f)
        if merged is None:
            merged = md
        elif md.signed_bytes != merged.signed_bytes:
            raise InputError(f"{f} holds a different root than the first file")
        else:
            merged.signatures.update(md.signatures)
    if merged is None:
        raise InputError("no root file given")
    return merged


def verify_rotation(current: Root, new: Metadata[Root]) -> None:
    """python-tuf's verdict on root N -> N+1.

    Raises:
        InputError: versions do not chain; consistent snapshots disabled; already expired.
        SecurityError: not signed by a threshold of root N's root keys and of its own.
    """
    if new.signed.version != current.version + 1:
        raise InputError(
            f"root versions do not chain: stored {current.version}, file {new.signed.version}",
            remedy="export a new root from the current one (`ota root export`)",
        )
    if not new.signed.consistent_snapshot:
        raise InputError("the new root disables consistent snapshots")
    if new.signed.is_expired(datetime.now(UTC)):
        raise InputError("the new root has already expired")
    payload = new.signed_bytes
    for who, root in (("the current root", current), ("the new root", new.signed)):
        try:
            root.verify_delegate(Root.type, payload, new.signatures)
        except UnsignedMetadataError as e:
            result = new.signed.get_root_verification_result(current, payload, new.signatures)
            raise SecurityError(
                f"root {new.signed.version} is not signed by a threshold of {who}'s root "
                f"keys: {e} (current root: {len(result.first.signed)} of "
                f"{result.first.threshold}; new root: {len(result.second.signed)} of "
                f"{result.second.threshold})",
                remedy="collect more signatures with `ota root sign` on the key holders' "
                "machines",
            ) from e


def _changed_roles(current: Root, new: Root) -> list[str]:
    def sig(r: Root, role: str) -> tuple[Any, ...]:
        return (sorted(r.roles[role].keyids), r.roles[role].threshold)

    return [r for r in _RESIGNABLE if sig(current, r) != sig(new, r)]


def _can_sign(project: Project, root: Root, roles: Iterable[str]) -> bool:
    """Whether this machine holds a threshold of ``root``'s keys for every role (dry run)."""
    try:
        for role in roles:
            r = root.roles[role]
            probe: Metadata[Targets] = Metadata(Targets())
            project.signers.sign(probe, {k: root.keys[k] for k in r.keyids}, r.threshold, role)
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class PublishedRoot:
    version: int
    resigned: tuple[str, ...]
    bridged: bool  # roles were signed by old and new keys before the root was written

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "resigned": list(self.resigned), "bridged": self.bridged}


def publish_root(project: Project, new: Metadata[Root], *, bridge: bool = True) -> PublishedRoot:
    """Verify and publish root N+1 (see the module docstring for the order of writes).

    ``bridge=False`` skips the old+new re-sign before the root write even when the old keys are
    here: after a snapshot-key rotation to a fresh key, no snapshot the new root accepts then
    lists the retired roles, so the re-sign after the write drops them
    (:mod:`ota.repository._retired`); devices polling between the two writes see one refusal.

    Raises:
        InputError / SecurityError: see :func:`verify_rotation`.
        ConfigError: the new keys of a re-signed role are not configured here.
        ConflictError: root N+1 was published concurrently.
    """
    store = project.storage
    current = newest_root(store).signed
    verify_rotation(current, new)
    changed = _changed_roles(current, new.signed)
    if not _can_sign(project, new.signed, changed):
        raise ConfigError(
            f"the new keys of {', '.join(changed)} are not configured in ota.toml",
            remedy="add their URIs to [signers] (e.g. `ota key rotate` records them)",
        )
    bridged = bridge and bool(changed) and _can_sign(project, current, changed)
    if bridged:  # metadata valid under root N and N+1 before N+1 appears
        run(store, project.signers, project.expiry(), lambda t: _resign(t, changed, new.signed))
    data = new.to_bytes(_COMPACT)
    try:
        store.put(md_key(Root.type, new.signed.version), data, if_none_match=True)
    except PreconditionFailed as e:
        raise ConflictError(f"root version {new.signed.version} exists already") from e
    store.put("metadata/root.json", data)
    if changed:
        run(store, project.signers, project.expiry(), lambda t: _resign(t, changed, None))
    _atomic.write_bytes(project.root_dir / "root.json", data)
    _forget_unused(project, new.signed)
    return PublishedRoot(new.signed.version, tuple(changed), bridged)


def _resign(txn: Transaction, roles: Sequence[str], cosign: Root | None) -> None:
    if cosign is not None:
        txn.cosign_with(cosign)
    for role in roles:
        txn.resign(role)
    txn.resign("snapshot")


def _forget_unused(project: Project, root: Root) -> None:
    """Drop signer URIs of keys that no role lists any more (rotated away or revoked)."""
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    used = set(root.keys)
    for role in (Targets.type, "releases", *txn.team_roles()):
        delegations = txn.targets(role).signed.delegations
        used |= set(delegations.keys) if delegations is not None else set()
    for keyid in [k for k in project.config.signers if k not in used]:
        project.set_signer(keyid, None)
    project.save_config()


def sign_with_project(project: Project, new: Metadata[Root]) -> bool:
    """Sign root N+1 with the root keys configured here (one-machine convenience).

    Returns True when python-tuf accepts the result for both roots; otherwise the root is left
    unsigned (for the offline ceremony) and False is returned.
    """
    current = newest_root(project.storage).signed
    keys: dict[str, Key] = {}
    for root in (new.signed, current):
        keys |= {k: root.keys[k] for k in root.roles[Root.type].keyids}
    new.signatures.clear()
    project.signers.sign_also(new, keys)
    try:
        verify_rotation(current, new)
    except SecurityError:
        new.signatures.clear()
        return False
    return True


__all__ = [
    "TOP_LEVEL_ROLES",
    "PublishedRoot",
    "RootChange",
    "export_root",
    "merge_signatures",
    "publish_root",
    "read_root_file",
    "sign_root_file",
    "sign_with_project",
    "verify_rotation",
    "write_root_file",
]
