"""Release records inside the metadata: the per-model index and the release targets.

Release targets live in the role :meth:`Transaction.bin_for` names (a team role for a team's
models, else a hash bin); index targets of every model live in the hash bins (online key).

The index target (``index/<name>.json``) is what devices read to find candidates, because hash
bins cannot be listed. It keeps the newest ``max_live`` releases with their rollout state and
the model's security floor; older releases stay published (and auditable) in the bins.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from tuf.api.metadata import TargetFile

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
    return txn.targets(txn.bin_for(path)).signed.targets.get(path)


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
    write_index(project, txn, replace(index, releases=tuple(live), security_floor=floor))
    txn.edit(txn.bin_for(info.path)).targets[info.path] = info


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
