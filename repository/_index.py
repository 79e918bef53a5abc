"""Release records inside the metadata: the per-model index and the release targets.

Release targets live in the role :meth:`Transaction.bin_for` names: a team role for a team's
models, else the model's own role ``model.<name>`` (ADR 0010), which also holds the index of
every model, team models included (online key). A release that leaves the index window moves to
the archive (``archive.h<prefix>`` segments, split in 16 when full), off every device's path.
In a repository not migrated yet (``ota migrate-layout``) both live in the hash bins.

The index target (``index/<name>.json``) is what devices read to find candidates, because hash
bins cannot be listed. It keeps the newest ``max_live`` releases with their rollout state and
the model's security floor; older releases stay published (and auditable) in the bins.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from tuf.api.metadata import TargetFile, Targets

from ota.bundle import (
    Manifest,
    ModelIndex,
    Release,
    RolloutState,
    TargetFacts,
    index_target_path,
    manifest_target_path,
)
from ota.errors import ConflictError, InputError, SecurityError
from ota.repository._layout import (
    archive_delegations,
    insert_model,
    model_delegation,
    path_hash,
    split_segment,
)
from ota.repository._meta import (
    ARCHIVE_ROLE,
    ARCHIVE_SEGMENT_CAP,
    ARCHIVE_SEGMENT_PREFIX,
    RELEASES_ROLE,
    model_role,
)
from ota.repository._project import put_target_file, target_storage_key
from ota.repository._storage import Storage
from ota.repository._trust import check_publisher
from ota.repository._txn import Transaction

if TYPE_CHECKING:
    from ota.repository._project import Project


class CounterTaken(ConflictError):
    """A concurrent publish of the same model committed the counter we signed."""


class UnknownRelease(InputError):
    """No such model or version."""


def _target(txn: Transaction, path: str) -> TargetFile | None:
    role = txn.find(path)
    return None if role is None else txn.targets(role).signed.targets.get(path)


def ensure_model_role(txn: Transaction, name: str) -> None:
    """Delegate ``model.<name>`` from ``releases`` unless it is (no-op in a repository not
    migrated yet: there the hash bins hold everything). Signed by the keys of the archive's
    delegation, i.e. the online key."""
    if txn.legacy_layout():
        return
    releases = txn.targets(RELEASES_ROLE).signed
    try:
        releases.get_delegated_role(model_role(name))
        return
    except ValueError:
        pass
    keyids = list(releases.get_delegated_role(ARCHIVE_ROLE).keyids)
    insert_model(txn.edit(RELEASES_ROLE), model_delegation(name, keyids))


def _segment_of(archive: Targets, path: str) -> str:
    """The segment python-tuf consults for ``path``: the segments' prefixes partition the hash
    space (a trie), so it is the one named by the longest delegated prefix of the path's hash
    (O(depth), not one sha256 per segment as ``get_roles_for_target`` computes)."""
    assert archive.delegations is not None
    roles = archive.delegations.roles or {}
    digest = path_hash(path)
    for n in range(len(digest) + 1):
        name = f"{ARCHIVE_SEGMENT_PREFIX}{digest[:n]}"
        if name in roles:
            return name
    raise SecurityError(f"no archive segment delegates {path}")


def archive_put(
    txn: Transaction, path: str, info: TargetFile, cap: int = ARCHIVE_SEGMENT_CAP
) -> None:
    """Add a release target to its archive segment; split the segment in 16 when it exceeds
    ``cap`` targets, :data:`ARCHIVE_SEGMENT_CAP` by default (the old one is retired, empty and
    still listed)."""
    archive = txn.targets(ARCHIVE_ROLE).signed
    if archive.delegations is None:  # the first archived release: one segment for all hashes
        releases = txn.targets(RELEASES_ROLE).signed
        assert releases.delegations is not None
        ids = releases.get_delegated_role(ARCHIVE_ROLE).keyids
        keys = {k: releases.delegations.keys[k] for k in ids}
        txn.edit(ARCHIVE_ROLE).delegations = archive_delegations(keys)
        archive = txn.targets(ARCHIVE_ROLE).signed
    assert archive.delegations is not None
    segment = _segment_of(archive, path)
    content = txn.edit(segment).targets
    content[path] = info
    if len(content) <= cap:
        return
    moved = dict(content)
    txn.retire(segment, txn.targets(segment).signed.version + 1)
    for child, targets in split_segment(txn.edit(ARCHIVE_ROLE), segment, moved).items():
        txn.edit(child).targets.update(targets)


def archive_dropped(txn: Transaction, index: ModelIndex) -> int:
    """Move the model's release targets its index no longer lists from its model role to the
    archive. Returns how many moved."""
    role = model_role(index.name)
    if txn.legacy_layout() or txn.find(index_target_path(index.name)) != role:
        return 0
    live = {manifest_target_path(index.name, r.version) for r in index.releases}
    targets = txn.targets(role).signed.targets
    gone = [p for p in targets if p.startswith("releases/") and p not in live]
    if not gone:
        return 0
    edited = txn.edit(role).targets
    for path in gone:
        archive_put(txn, path, edited.pop(path))
    return len(gone)


def read_index(txn: Transaction, name: str) -> ModelIndex | None:
    """The model's index as committed (or as edited in ``txn``), or None for a new model."""
    info = _target(txn, index_target_path(name))
    return None if info is None else ModelIndex.from_custom(info.custom)


def read_facts(txn: Transaction, name: str, version: str) -> TargetFacts | None:
    info = _target(txn, manifest_target_path(name, version))
    return None if info is None else TargetFacts.from_custom(info.custom)


def release_target(txn: Transaction, name: str, version: str) -> TargetFile:
    info = _target(txn, manifest_target_path(name, version))
    if info is None:
        raise UnknownRelease(f"{name} {version} is not published")
    return info


def load_manifest(store: Storage, txn: Transaction, name: str, version: str) -> Manifest:
    """Fetch and check a release's manifest against its signed target hash.

    Raises:
        UnknownRelease: not published.
        SecurityError: the stored manifest does not match its target.
    """
    import hashlib

    info = release_target(txn, name, version)
    sha = info.hashes["sha256"]
    data, _ = store.get(target_storage_key(info.path, sha), max_bytes=info.length)
    if hashlib.sha256(data).hexdigest() != sha or len(data) != info.length:
        raise SecurityError(f"stored manifest of {name} {version} does not match its target")
    return Manifest.from_bytes(data)


def write_index(project: Project, txn: Transaction, index: ModelIndex) -> None:
    path = index_target_path(index.name)
    info = put_target_file(project.storage, path, index.to_bytes())
    info.unrecognized_fields["custom"] = index.to_custom()
    ensure_model_role(txn, index.name)
    txn.edit(txn.bin_for(path)).targets[path] = info


def add_release(
    project: Project,
    txn: Transaction,
    info: TargetFile,
    release: Release,
    *,
    ring: str,
    percent: float,
    max_live: int,
) -> None:
    """Add a release target and its index entry inside ``txn``.

    Raises:
        CounterTaken: the index already holds this counter or a higher one.
        InputError: this publisher may not publish the model (team globs, signing key; see
            :func:`ota.repository._trust.check_publisher`).
    """
    check_publisher(project, txn, release.name, info.path)
    index = read_index(txn, release.name) or ModelIndex(name=release.name)
    if any(r.counter >= release.counter for r in index.releases):
        raise CounterTaken(f"counter {release.counter} of {release.name} was taken")
    entry = RolloutState(release.version, release.counter, ring=ring, percent=percent)
    live = sorted([*index.releases, entry], key=lambda r: r.counter)[-max_live:]
    floor = max(index.security_floor, release.security_floor)
    new_index = replace(index, releases=tuple(live), security_floor=floor)
    write_index(project, txn, new_index)
    txn.edit(txn.bin_for(info.path)).targets[info.path] = info
    archive_dropped(txn, new_index)


def update_rollout(
    project: Project,
    txn: Transaction,
    name: str,
    version: str,
    **changes: object,
) -> RolloutState:
    """Change the rollout state of a live release (ring, percent, paused, yanked).

    Raises:
        UnknownRelease: the model or version is not in the index.
    """
    index = read_index(txn, name)
    entry = index.get(version) if index else None
    if index is None or entry is None:
        raise UnknownRelease(f"{name} {version} is not a live release", remedy="see `ota releases`")
    new = replace(entry, **changes)  # type: ignore[arg-type]
    RolloutState.from_dict(new.to_dict())  # validate ring/percent
    releases = tuple(new if r.version == version else r for r in index.releases)
    write_index(project, txn, replace(index, releases=releases))
    return new


def model_names(store: Storage) -> list[str]:
    """Names of every model that has an index (from the target file names in storage)."""
    names = set()
    for key in store.list("targets/index/"):
        base = key.rsplit("/", 1)[-1]
        _sha, _, rest = base.partition(".")
        if rest.endswith(".json"):
            names.add(rest[: -len(".json")])
    return sorted(names)
