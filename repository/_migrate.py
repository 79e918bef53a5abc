"""``ota migrate-layout``: from the hash bins of ADR 0002 to the per-model layout of ADR 0010.

One publish transaction (``_txn.run``): nothing is visible until the new head is written, so a
crash at any point leaves the repository as it was (and unreferenced files for ``ota gc``); run
again, it starts over. On a repository already migrated it changes nothing (idempotent).

What the commit holds:

* ``releases`` re-signed with named delegations: a ``model.<name>`` role per model that has an
  index, then ``audit.log``, then ``archive.dir``;
* each model role with the model's index and the release targets the index lists; every other
  release target in the archive segments (split as they fill); the audit anchor in ``audit.log``;
* every old hash bin **retired**: written once more, empty, all at one common version, and kept
  in the snapshot without a length. python-tuf refuses a new snapshot that drops a role the
  device's trusted snapshot lists (rollback protection, TUF 5.5.5), so a device holding the old
  metadata could not update if the bins disappeared; entries that differ only in the bin's name
  cost a few bytes each compressed, and no delegation reaches the bins any more, so no client
  ever downloads them.

Only the online key signs (``releases`` and everything below it): ``targets``, root and team
roles are untouched, and devices need nothing but their usual refresh.

Optional, with the root keys here: ``--drop-retired`` (:func:`drop_retired`) then rotates the
snapshot key to a freshly generated one **without a bridge** (root N+1 signed and published
here). A device's stored snapshot, signed by the old key only, no longer verifies under root
N+1, so python-tuf discards it instead of comparing the new snapshot with it, and the first
snapshot signed by the new key omits the retired entries (:mod:`ota.repository._retired`).
Devices that poll between the root write and that snapshot (one transaction) see one refusal
and succeed at their next poll.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import TargetFile

from ota.bundle import ModelIndex, manifest_target_path
from ota.errors import InputError, SecurityError
from ota.repository._index import archive_put, ensure_model_role
from ota.repository._layout import new_tree_delegations
from ota.repository._meta import AUDIT_ROLE, RELEASES_ROLE, model_role
from ota.repository._retired import lengthless
from ota.repository._txn import Transaction, run

if TYPE_CHECKING:
    from ota.repository._project import Project


@dataclass(frozen=True)
class MigrateResult:
    """What ``ota migrate-layout`` did (``migrated`` False: already in the new layout)."""

    migrated: bool
    models: int = 0
    live_releases: int = 0
    archived_releases: int = 0
    retired_bins: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "migrated": self.migrated,
            "models": self.models,
            "live_releases": self.live_releases,
            "archived_releases": self.archived_releases,
            "retired_bins": self.retired_bins,
        }


def migrate(txn: Transaction) -> MigrateResult:
    """Inside ``txn``: rewrite the layout (see the module docstring). Pure function of what
    ``txn`` reads, so :func:`ota.repository._txn.run` may re-run it after a conflict.

    Raises:
        SecurityError: a bin holds a target outside ``releases/``, ``index/`` and ``audit/``
            (not written by edge-ota: refuse rather than guess where it belongs).
    """
    if not txn.legacy_layout():
        return MigrateResult(migrated=False)
    listed = txn.snapshot.signed.meta
    bins = [b for b in txn.succinct().get_roles() if f"{b}.json" in listed]
    content: dict[str, TargetFile] = {}
    for b in bins:
        content.update(txn.targets(b).signed.targets)
    for path in content:
        if not path.startswith(("releases/", "index/", "audit/")):
            raise SecurityError(f"hash bin holds {path!r}, which no edge-ota command writes")
    common = max((listed[f"{b}.json"].version for b in bins), default=0) + 1
    for b in bins:  # with the keys that delegate them now, before the delegation goes
        txn.retire(b, common)
    releases = txn.edit(RELEASES_ROLE)
    assert releases.delegations is not None
    releases.delegations = new_tree_delegations(releases.delegations.keys)
    live: set[str] = set()
    models = 0
    for path, info in sorted(content.items()):
        if not path.startswith("index/"):
            continue
        index = ModelIndex.from_custom(info.custom)
        if path != f"index/{index.name}.json":
            raise SecurityError(f"index target {path} describes model {index.name}")
        ensure_model_role(txn, index.name)
        txn.edit(model_role(index.name)).targets[path] = info
        live |= {manifest_target_path(index.name, r.version) for r in index.releases}
        models += 1
    kept = archived = 0
    for path, info in sorted(content.items()):
        if path.startswith("audit/"):
            txn.edit(AUDIT_ROLE).targets[path] = info
        elif path.startswith("releases/") and path in live:
            txn.edit(model_role(path.split("/")[1])).targets[path] = info
            kept += 1
        elif path.startswith("releases/"):
            archive_put(txn, path, info)
            archived += 1
    return MigrateResult(True, models, kept, archived, len(bins))


def migrate_layout(project: Project) -> MigrateResult:
    """Migrate the project's repository to the ADR 0010 layout in one transaction.

    Raises:
        ConfigError: the online key is not configured here.
        ConflictError: other publishers kept committing first.
        SecurityError: see :func:`migrate`.
    """
    return run(project.storage, project.signers, project.expiry(), migrate)


@dataclass(frozen=True)
class DropResult:
    """What ``ota migrate-layout --drop-retired`` did."""

    dropped: int
    root_version: int | None = None
    new_snapshot_keyid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dropped_retired": self.dropped,
            "root_version": self.root_version,
            "new_snapshot_keyid": self.new_snapshot_keyid,
        }


def drop_retired(project: Project) -> DropResult:
    """Forget the retired roles' snapshot entries: rotate the snapshot key to a fresh key
    without a bridge (module docstring). Nothing to do (``dropped`` 0, nothing written) when
    the snapshot lists no retired role.

    Raises:
        InputError: the repository is not migrated yet.
        MissingKeys (ConfigError): the root keys (or the timestamp key) are not usable here;
            nothing was written.
        SecurityError / ConflictError: see :func:`~ota.repository._rootceremony.publish_root`.
    """
    from ota.repository._keyadmin import rotate
    from ota.repository._preflight import require_keys

    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    if txn.legacy_layout():
        raise InputError("the repository still has hash bins", remedy="run it without the flag")
    before = len(lengthless(txn.snapshot.signed))
    if before == 0:
        return DropResult(0)
    require_keys(project, "ota migrate-layout --drop-retired", roles=["root"], logged=False)
    change = rotate(project, "snapshot", None, bridge=False)
    after = Transaction.begin(project.storage, project.signers, project.expiry())
    return DropResult(
        before - len(lengthless(after.snapshot.signed)),
        change.root_version,
        change.new_keyid,
    )
