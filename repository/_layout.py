"""The delegation tree ``ota init`` creates (``docs/adr/0004-keys-and-delegations.md``).

Top-level ``targets`` (offline key) delegates named roles: team roles (added later by
``ota delegate add``, always before the catch-all) and the catch-all online ``releases`` role,
which delegates succinct hash bins, all signed by the online bins key.
"""

from __future__ import annotations

from datetime import datetime

from securesystemslib.signer import SSlibKey
from tuf.api.metadata import DelegatedRole, Delegations, Root, SuccinctRoles, Targets

from ota.repository._meta import BINS_PREFIX, RELEASES_ROLE, Expiry

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


def top_level(
    role_keys: dict[str, list[SSlibKey]],
    root_threshold: int,
    bins: int,
    expiry: Expiry,
    now: datetime,
) -> tuple[Root, Targets, Targets, SuccinctRoles]:
    """Root (consistent snapshots); top-level targets delegating to the online ``releases``
    role (team roles are inserted before it by ``ota delegate add``); the ``releases`` role
    delegating to succinct hash bins (all signed by the online bins key)."""
    root = Root(expires=now + expiry.for_role("root"), consistent_snapshot=True)
    for role in ("root", "targets", "snapshot", "timestamp"):
        for key in role_keys[role]:
            root.add_key(key, role)
    root.roles["root"].threshold = root_threshold
    online = role_keys["bins"]
    succinct = SuccinctRoles(
        keyids=[k.keyid for k in online],
        threshold=1,
        bit_length=bins.bit_length() - 1,
        name_prefix=BINS_PREFIX,
    )
    targets = Targets(expires=now + expiry.for_role("targets"))
    targets.delegations = Delegations(
        keys={k.keyid: k for k in online},
        roles={RELEASES_ROLE: releases_delegation(online)},
    )
    releases = Targets(expires=now + expiry.for_role(RELEASES_ROLE))
    releases.delegations = Delegations(keys={k.keyid: k for k in online}, succinct_roles=succinct)
    return root, targets, releases, succinct
