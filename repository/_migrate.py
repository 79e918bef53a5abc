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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import TargetFile

from ota.bundle import ModelIndex, manifest_target_path
from ota.errors import SecurityError
from ota.repository._index import archive_put, ensure_model_role
from ota.repository._layout import new_tree_delegations
from ota.repository._meta import AUDIT_ROLE, RELEASES_ROLE, model_role
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
