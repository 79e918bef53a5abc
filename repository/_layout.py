"""The delegation tree ``ota init`` creates, and the pure parts of its growth (ADR 0010).

Top-level ``targets`` (offline key) delegates named roles: team roles (added later by
``ota delegate add``, always before the catch-all) and the catch-all online ``releases`` role.
``releases`` (online key) delegates, in this order:

* one role per model, ``model.<name>`` (paths ``index/<name>.json`` and ``releases/<name>/*``,
  **not** terminating), holding the model's index and the releases the index lists; added by
  the model's first publish (:func:`model_delegation`);
* ``audit.log`` (``audit/*``, terminating): the audit-log anchor, rewritten by every logged
  command, kept off every device's path;
* ``archive.dir`` (``releases/*/*``, terminating), last: releases that left their model's index
  window. It delegates segments ``archive.h<prefix>`` by ``path_hash_prefixes`` (a trie over
  sha256 of the target path); a segment beyond :data:`ARCHIVE_SEGMENT_CAP` targets is split in
  16 (:func:`split_segment`), so no operator sizes anything.

A lookup of a live release stops in its model role; an archived release falls through the model
role (not terminating) to the archive, exactly as python-tuf walks it. The snapshot lists every
role ever delegated (python-tuf refuses a snapshot that drops one), so retired roles stay listed,
frozen: see :mod:`ota.repository._migrate`.

Before ADR 0010 ``releases`` delegated succinct hash bins ``bins-*`` of a count fixed at init
(ADR 0002); :func:`top_level` still builds that tree with ``legacy_bins`` (tests of the
migration only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from securesystemslib.signer import SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Key,
    Root,
    SuccinctRoles,
    TargetFile,
    Targets,
)

from ota.repository._meta import (
    ARCHIVE_ROLE,
    ARCHIVE_SEGMENT_PREFIX,
    AUDIT_ROLE,
    BINS_PREFIX,
    RELEASES_ROLE,
    Expiry,
    model_role,
)

# online paths: releases no team owns, every model index, the audit log anchor (_auditlog.py)
RELEASES_PATHS = ("releases/*/*", "index/*", "audit/*")


def releases_delegation(keys: list[SSlibKey]) -> DelegatedRole:
    """The catch-all online role: every release path no team owns, and every index target."""
    return DelegatedRole(
        name=RELEASES_ROLE,
        keyids=[k.keyid for k in keys],
        threshold=1,
        terminating=True,
        paths=list(RELEASES_PATHS),
    )


def model_delegation(name: str, keyids: list[str]) -> DelegatedRole:
    """``model.<name>``: the model's index and live releases. Not terminating, so a release
    that left the index window is found in the archive delegated after it."""
    return DelegatedRole(
        name=model_role(name),
        keyids=list(keyids),
        threshold=1,
        terminating=False,
        paths=[f"index/{name}.json", f"releases/{name}/*"],
    )


def segment_delegation(prefix: str, keyids: list[str]) -> DelegatedRole:
    """An archive segment: every release path whose sha256 (hex) starts with ``prefix``."""
    return DelegatedRole(
        name=f"{ARCHIVE_SEGMENT_PREFIX}{prefix}",
        keyids=list(keyids),
        threshold=1,
        terminating=True,
        path_hash_prefixes=[prefix],
    )


def new_tree_delegations(keys: Mapping[str, Key]) -> Delegations:
    """The delegations of a ``releases`` role with no model yet: audit role, then archive."""
    keyids = list(keys)
    return Delegations(
        keys=dict(keys),
        roles={
            AUDIT_ROLE: DelegatedRole(AUDIT_ROLE, keyids, 1, True, paths=["audit/*"]),
            ARCHIVE_ROLE: DelegatedRole(ARCHIVE_ROLE, keyids, 1, True, paths=["releases/*/*"]),
        },
    )


def archive_delegations(keys: Mapping[str, Key]) -> Delegations:
    """The archive's first delegation: one segment holding every hash (prefix "")."""
    seg = segment_delegation("", list(keys))
    return Delegations(keys=dict(keys), roles={seg.name: seg})


def path_hash(path: str) -> str:
    """sha256 of a target path, hex: what ``path_hash_prefixes`` are matched against."""
    return hashlib.sha256(path.encode()).hexdigest()


def split_segment(
    archive: Targets, segment: str, content: dict[str, TargetFile]
) -> dict[str, dict[str, TargetFile]]:
    """Replace ``segment`` in the archive's delegations by its 16 children (one more hex digit
    of prefix) and return the children's targets. The caller empties ``segment`` (it stays in
    the snapshot, frozen) and writes the children."""
    assert archive.delegations is not None
    assert archive.delegations.roles is not None
    old = archive.delegations.roles[segment]
    prefix = (old.path_hash_prefixes or [""])[0]
    children: dict[str, dict[str, TargetFile]] = {}
    roles = {k: v for k, v in archive.delegations.roles.items() if k != segment}
    for digit in "0123456789abcdef":
        child = segment_delegation(prefix + digit, old.keyids)
        roles[child.name] = child
        children[child.name] = {}
    for path, info in content.items():
        children[f"{ARCHIVE_SEGMENT_PREFIX}{path_hash(path)[: len(prefix) + 1]}"][path] = info
    archive.delegations.roles = roles
    return children


def insert_model(releases: Targets, role: DelegatedRole) -> None:
    """Add a model role to ``releases`` before the audit role and the archive (python-tuf
    consults delegations in order)."""
    assert releases.delegations is not None
    assert releases.delegations.roles is not None
    roles = releases.delegations.roles
    tail = {k: roles[k] for k in (AUDIT_ROLE, ARCHIVE_ROLE) if k in roles}
    head = {k: v for k, v in roles.items() if k not in tail}
    releases.delegations.roles = {**head, role.name: role, **tail}


@dataclass(frozen=True)
class InitialRoles:
    """The online roles ``ota init`` writes at version 1 besides ``releases``, empty: every
    role ``releases`` delegates must be in the snapshot (python-tuf refuses a walk past a
    delegated role the snapshot does not list)."""

    names: tuple[str, ...] = ()

    def get_roles(self) -> list[str]:
        return list(self.names)


def top_level(
    role_keys: dict[str, list[SSlibKey]],
    root_threshold: int,
    bins: int,
    expiry: Expiry,
    now: datetime,
    *,
    legacy_bins: bool = False,
) -> tuple[Root, Targets, Targets, InitialRoles]:
    """Root (consistent snapshots); top-level targets delegating to the online ``releases``
    role (team roles are inserted before it by ``ota delegate add``); the ``releases`` role
    with the ADR 0010 delegations (``bins`` is ignored), or with ``legacy_bins`` the succinct
    hash bins of ADR 0002 (``bins`` of them)."""
    root = Root(expires=now + expiry.for_role("root"), consistent_snapshot=True)
    for role in ("root", "targets", "snapshot", "timestamp"):
        for key in role_keys[role]:
            root.add_key(key, role)
    root.roles["root"].threshold = root_threshold
    online = role_keys["bins"]
    keys = {k.keyid: k for k in online}
    targets = Targets(expires=now + expiry.for_role("targets"))
    targets.delegations = Delegations(
        keys=dict(keys),
        roles={RELEASES_ROLE: releases_delegation(online)},
    )
    releases = Targets(expires=now + expiry.for_role(RELEASES_ROLE))
    if not legacy_bins:
        releases.delegations = new_tree_delegations(keys)
        return root, targets, releases, InitialRoles((AUDIT_ROLE, ARCHIVE_ROLE))
    succinct = SuccinctRoles(
        keyids=list(keys),
        threshold=1,
        bit_length=bins.bit_length() - 1,
        name_prefix=BINS_PREFIX,
    )
    releases.delegations = Delegations(keys=dict(keys), succinct_roles=succinct)
    return root, targets, releases, InitialRoles(tuple(succinct.get_roles()))


def replace_online_keys(delegator: Targets, old: list[str], new: SSlibKey) -> None:
    """In one online delegator (``releases`` or ``archive.dir``, either layout): every
    delegation signed by a key of ``old`` is signed by ``new`` instead."""
    d = delegator.delegations
    if d is None:
        return
    if d.succinct_roles is not None:
        for k in old:
            delegator.revoke_key(k)
        delegator.add_key(new)
        return
    for name in list(d.roles or {}):
        for k in old:
            if k in delegator.get_delegated_role(name).keyids:
                delegator.revoke_key(k, name)
        delegator.add_key(new, name)
