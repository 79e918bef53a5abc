"""Team delegations: ``ota delegate add|list|add-key|revoke-key``.

A team role is a TUF delegated role of the top-level ``targets`` role, placed before the online
``releases`` role, terminating, with paths ``releases/<glob>/*`` for the team's model globs and
its own keys and threshold. A device (python-tuf) looking up a release of a team model consults
only that role, so neither the online key nor another team can publish such a release; the
online key still steers its rollout through the index in the hash bins.

Every edit of a delegation is signed by the offline ``targets`` key, in one transaction with the
matching change of ``trust/signers.json``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import DelegatedRole, Root, Snapshot, Targets, Timestamp

from ota.bundle import SignerEntry
from ota.errors import InputError, SecurityError
from ota.repository._index import model_names, read_index
from ota.repository._keyspec import KeySpec
from ota.repository._trust import read_signers, write_signers
from ota.repository._txn import BINS_PREFIX, RELEASES_ROLE, Transaction, run

if TYPE_CHECKING:
    from ota.repository._project import Project

_TEAM_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")
_GLOB_RE = re.compile(r"^[a-z0-9._*?\[\]!-]{1,64}\Z")
_RESERVED = {RELEASES_ROLE, Root.type, Targets.type, Snapshot.type, Timestamp.type, "index"}


@dataclass(frozen=True)
class TeamInfo:
    """A team role as delegated, for ``ota delegate list``."""

    name: str
    models: tuple[str, ...]
    keyids: tuple[str, ...]
    threshold: int
    signing_keys: tuple[str, ...]
    releases: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "team": self.name,
            "models": list(self.models),
            "keyids": list(self.keyids),
            "threshold": self.threshold,
            "model_signing_keys": list(self.signing_keys),
            "release_targets": self.releases,
        }


def validate_team(name: str) -> str:
    """Raises InputError unless ``name`` can be a team role name."""
    if not _TEAM_RE.match(name) or name in _RESERVED or name.startswith(BINS_PREFIX):
        raise InputError(
            f"invalid team name {name!r}",
            remedy="use 1-32 of a-z, 0-9, '-', starting with a letter; not releases, bins*, "
            "or a top-level role name",
        )
    return name


def _globs_of(role: DelegatedRole) -> tuple[str, ...]:
    return tuple(p.split("/")[1] for p in role.paths or [])


def _team_role(txn: Transaction, team: str) -> DelegatedRole:
    if team not in txn.team_roles():
        raise InputError(f"no team named {team}", remedy="see `ota delegate list`")
    role = txn.targets().signed.get_delegated_role(team)
    assert isinstance(role, DelegatedRole)
    return role


def list_teams(project: Project) -> list[TeamInfo]:
    """Every team role in delegation order, with its keys and model-signing keys."""
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    signers = read_signers(project, txn)
    out = []
    for team in txn.team_roles():
        role = _team_role(txn, team)
        globs = _globs_of(role)
        signing = tuple(e.keyid for e in signers if set(e.models) & set(globs))
        count = len(txn.targets(team).signed.targets)
        out.append(TeamInfo(team, globs, tuple(role.keyids), role.threshold, signing, count))
    return out


def add_team(
    project: Project,
    team: str,
    models: Sequence[str],
    keys: Sequence[KeySpec],
    threshold: int,
    signing_pems: Sequence[bytes] = (),
) -> TeamInfo:
    """Delegate ``releases/<glob>/*`` for each model glob to a new team role.

    Key URIs among ``keys`` are recorded in ``ota.toml`` (this machine may then sign as the
    team). ``signing_pems`` (P-256 model-signing public keys) are listed in
    ``trust/signers.json`` for the team's globs.

    Raises:
        InputError: bad name, glob or threshold; the team exists; a glob is already delegated;
            a published model matches the globs (its releases live in the bins and would vanish
            from devices' view).
        ConfigError: the offline targets key is not configured here.
    """
    from ota.repository._project import key_fingerprint

    validate_team(team)
    if not models:
        raise InputError("a team needs at least one --models glob")
    for glob in models:
        if not _GLOB_RE.match(glob):
            raise InputError(f"invalid model glob {glob!r}", remedy="e.g. 'vision-*' (no '/')")
    if not keys or not 1 <= threshold <= len(keys):
        raise InputError(f"--threshold must be between 1 and the number of keys ({len(keys)})")
    taken = [
        n for n in model_names(project.storage) if any(fnmatch.fnmatchcase(n, g) for g in models)
    ]
    entries = [(key_fingerprint(pem), pem) for pem in signing_pems]

    def change(txn: Transaction) -> TeamInfo:
        if team in txn.team_roles():
            raise InputError(f"team {team} exists already", remedy="use `ota delegate add-key`")
        for other in txn.team_roles():
            clash = set(_globs_of(_team_role(txn, other))) & set(models)
            if clash:
                raise InputError(f"{', '.join(sorted(clash))} already delegated to {other}")
        published = [n for n in taken if (idx := read_index(txn, n)) and idx.releases]
        if published:
            raise InputError(
                f"published models match the globs: {', '.join(published)}",
                remedy="choose globs that match only new model names",
            )
        top = txn.edit(Targets.type)
        if top.delegations is None or top.delegations.roles is None:
            raise SecurityError("top-level targets has no named delegations (not an edge-ota repo)")
        role = DelegatedRole(
            name=team,
            keyids=[k.keyid for k in keys],
            threshold=threshold,
            terminating=True,
            paths=[f"releases/{g}/*" for g in models],
        )
        roles = dict(top.delegations.roles)
        catch_all = roles.pop(RELEASES_ROLE)
        top.delegations.roles = {**roles, team: role, RELEASES_ROLE: catch_all}
        for k in keys:
            top.delegations.keys[k.keyid] = k.key
        if entries:
            signers = read_signers(project, txn)
            known = {e.keyid: e for e in signers}
            for fp, pem in entries:
                old = known.get(fp)
                globs = tuple(sorted({*models, *(old.models if old else ())}))
                known[fp] = SignerEntry(fp, pem.decode(), globs)
            write_signers(project, txn, list(known.values()))
        return TeamInfo(
            team, tuple(models), tuple(role.keyids), threshold, tuple(e[0] for e in entries), 0
        )

    info = run(project.storage, project.signers, project.expiry(), change)
    for k in keys:
        if k.uri:
            project.set_signer(k.keyid, k.uri)
    project.save_config()
    return info


def add_team_key(
    project: Project, team: str, key: KeySpec, threshold: int | None = None
) -> TeamInfo:
    """Add a key to a team role (and optionally change its threshold); offline targets key.

    Raises:
        InputError: unknown team, key already listed, bad threshold.
        ConfigError: the targets key is not configured here.
    """

    def change(txn: Transaction) -> None:
        role = _team_role(txn, team)
        if key.keyid in role.keyids:
            raise InputError(f"key {key.keyid[:16]} is already a key of {team}")
        top = txn.edit(Targets.type)
        top.add_key(key.key, team)
        if threshold is not None:
            if not 1 <= threshold <= len(role.keyids):
                raise InputError(f"--threshold must be between 1 and {len(role.keyids)}")
            role.threshold = threshold

    run(project.storage, project.signers, project.expiry(), change)
    if key.uri:
        project.set_signer(key.keyid, key.uri)
        project.save_config()
    return next(t for t in list_teams(project) if t.name == team)


def revoke_team_key(
    project: Project,
    team: str,
    keyid: str,
    *,
    replacement: KeySpec | None = None,
    force: bool = False,
) -> TeamInfo:
    """Remove ``keyid`` from a team role (offline targets key), optionally adding a replacement.

    Devices stop accepting the team role as soon as it is no longer signed by a threshold of its
    listed keys: releases signed only by the revoked key are refused from the next refresh.
    If this machine holds a threshold of the remaining keys, the team role is re-signed in the
    same transaction (review its targets first: a compromised key may have added some).

    Raises:
        InputError: unknown team or key; the role would fall under its threshold and neither
            ``replacement`` nor ``force`` (freeze the team until it gets a new key) was given.
        ConfigError: the targets key is not configured here.
    """
    if replacement is not None and replacement.uri:
        project.set_signer(replacement.keyid, replacement.uri)

    def change(txn: Transaction) -> None:
        role = _team_role(txn, team)
        if keyid not in role.keyids:
            raise InputError(f"key {keyid[:16]} is not a key of {team}")
        top = txn.edit(Targets.type)
        top.revoke_key(keyid, team)
        if replacement is not None:
            top.add_key(replacement.key, team)
        if len(role.keyids) < role.threshold and not force:
            raise InputError(
                f"revoking {keyid[:16]} leaves {team} with {len(role.keyids)} keys, "
                f"threshold {role.threshold}",
                remedy="pass --replacement KEY, or --force to freeze the team's releases",
            )
        held = [k for k in role.keyids if k in project.config.signers]
        if len(held) >= role.threshold and f"{team}.json" in txn.snapshot.signed.meta:
            txn.resign(team)

    run(project.storage, project.signers, project.expiry(), change)
    project.set_signer(keyid, None)
    project.save_config()
    return next(t for t in list_teams(project) if t.name == team)
