"""``ota migrate-layout --drop-retired``: the snapshot forgets the retired hash bins after a
snapshot-key rotation without a bridge, and every client holding old metadata crosses it
(ADR 0010, ``repository/_retired.py``).

Real parts: a repository in the old layout published to and served by ``ota serve`` over HTTP,
a real device (``update_once``), our TUF session and the stock python-tuf ``Updater`` each
holding the metadata of before the migration or of between migration and rotation.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from click.testing import CliRunner

from ota.bundle import manifest_target_path
from ota.client import init_device, update_once
from ota.client._fetch import FetchConfig, make_pool
from ota.client._tuf import TufSession
from ota.repository import Project
from ota.repository._keyadmin import rotate
from ota.repository._migrate import drop_retired, migrate_layout
from ota.repository._retired import lengthless
from ota.repository._txn import Transaction
from tests.repo_helpers import make_project, publish_mlp, serve_dir, stock_updater
from tests.updater_world import FAST


def _txn(project: Project) -> Transaction:
    return Transaction.begin(project.storage, project.signers, project.expiry())


def _legacy(tmp_path: Path) -> Project:
    project = make_project(tmp_path, bins=8, legacy_bins=True)
    project.config = replace(project.config, max_live_releases=1)
    project.save_config()
    project = Project.open(project.root_dir)
    publish_mlp(project, "alpha", "1.0.0")
    publish_mlp(project, "alpha", "1.1.0", seed=1)  # 1.0.0 leaves the index window
    publish_mlp(project, "beta", "1.0.0", seed=2)
    return project


def _every_target(project: Project) -> list[str]:
    txn = _txn(project)
    out = list(txn.targets().signed.targets)
    for role in txn.release_roles():
        out += list(txn.targets(role).signed.targets)
    return out


def _session(project: Project, url: str, work: Path) -> TufSession:
    cfg = FetchConfig(retries=0)
    return TufSession(work / "metadata", work / "cache", url,
                      (project.root_dir / "root.json").read_bytes(), pool=make_pool(cfg),
                      fetch_cfg=cfg)  # fmt: skip


def test_drop_retired_after_an_unbridged_snapshot_rotation_keeps_old_clients_updating(
    tmp_path: Path,
) -> None:
    from ota.cli._main import _register, cli

    project = _legacy(tmp_path)
    root = project.storage.local_root()
    assert root is not None
    trusted = (project.root_dir / "root.json").read_bytes()
    with serve_dir(root) as url:
        dev = tmp_path / "dev"
        init_device(dev, url, trusted, "dev-1", ["alpha"], ring="canary", health_timeout_s=0)
        res = update_once(dev, fetch_config=FAST)
        assert res.outcomes[0].status == "updated", res.to_dict()
        legacy_stock = stock_updater(url, trusted, tmp_path / "stock-legacy")
        legacy_stock.refresh()  # holds the snapshot listing the 8 bins with lengths

        assert migrate_layout(project).retired_bins == 8
        retired = lengthless(_txn(project).snapshot.signed)
        assert sorted(retired) == [f"bins-{i}" for i in range(8)]
        mid_stock = stock_updater(url, trusted, tmp_path / "stock-mid")
        mid_stock.refresh()  # holds the migrated snapshot listing the retired bins
        mid_session = _session(project, url, tmp_path / "session-mid")
        mid_session.refresh()
        old_snapshot_key = set(_txn(project).root().signed.roles["snapshot"].keyids)

        _register()
        out = CliRunner().invoke(cli, ["migrate-layout", "--drop-retired", "--json",
                                       "--project", str(project.root_dir)])  # fmt: skip
        assert out.exit_code == 0, out.output
        doc = json.loads(out.output)
        assert doc["migrated"] is False  # already migrated: only the drop step ran
        assert doc["dropped_retired"] == 8
        assert doc["root_version"] == 2
        project = Project.open(project.root_dir)
        txn = _txn(project)
        assert lengthless(txn.snapshot.signed) == []
        assert not any(n.startswith("bins-") for n in txn.snapshot.signed.meta)
        new_key = set(txn.root().signed.roles["snapshot"].keyids)
        assert new_key == {doc["new_snapshot_keyid"]} and not new_key & old_snapshot_key
        snap_doc = json.loads((root / "metadata" / f"{txn.snapshot.signed.version}"
                                                   ".snapshot.json").read_bytes())  # fmt: skip
        assert {s["keyid"] for s in snap_doc["signatures"]} == new_key  # no bridge

        # every client holding old metadata crosses the rotation: root 2, then a snapshot
        # without the entries its stored (now unverifiable) snapshot listed
        publish_mlp(project, "alpha", "1.2.0", seed=3)
        res = update_once(dev, fetch_config=FAST)
        assert res.outcomes[0].status == "updated", res.to_dict()
        assert res.outcomes[0].version == "1.2.0"
        paths = _every_target(project)
        assert manifest_target_path("alpha", "1.0.0") in paths  # archived, still verifiable
        for name in ("stock-legacy", "stock-mid", "stock-fresh"):
            stock = stock_updater(url, trusted, tmp_path / name)
            stock.refresh()
            for path in paths:
                assert stock.get_targetinfo(path) is not None, (name, path)
        mid_session = _session(project, url, tmp_path / "session-mid")
        mid_session.refresh()
        assert mid_session.release("alpha", "1.2.0") is not None

    # idempotent: nothing left to drop, no new root
    again = drop_retired(Project.open(project.root_dir))
    assert again.dropped == 0 and again.root_version is None
    assert not (root / "metadata" / "3.root.json").exists()


def test_a_bridged_snapshot_rotation_keeps_the_retired_entries(tmp_path: Path) -> None:
    """A bridged rotation signs a snapshot listing the retired roles with the new key before
    root 2 appears: a device may hold it as trusted under root 2, so nothing may be dropped."""
    project = _legacy(tmp_path)
    migrate_layout(project)
    listed = sorted(lengthless(_txn(project).snapshot.signed))
    assert len(listed) == 8
    change = rotate(project, "snapshot")  # the old key is here: bridged
    assert change.root_published
    project = Project.open(project.root_dir)
    assert sorted(lengthless(_txn(project).snapshot.signed)) == listed
    publish_mlp(project, "beta", "1.1.0", seed=4)  # and a later publish keeps them too
    assert sorted(lengthless(_txn(project).snapshot.signed)) == listed


def test_drop_retired_without_the_root_keys_refuses_and_writes_nothing(tmp_path: Path) -> None:
    from ota.cli._main import _register, cli

    project = _legacy(tmp_path)
    migrate_layout(project)
    for keyid in _txn(project).root().signed.roles["root"].keyids:
        project.set_signer(keyid, None)  # the root keys live on an offline machine
    project.save_config()
    root = project.storage.local_root()
    assert root is not None
    before = sorted(p.name for p in (root / "metadata").iterdir())
    _register()
    out = CliRunner().invoke(cli, ["migrate-layout", "--drop-retired",
                                   "--project", str(project.root_dir)])  # fmt: skip
    assert out.exit_code == 9, out.output  # configuration: the root keys are not here
    assert "root" in out.output
    assert sorted(p.name for p in (root / "metadata").iterdir()) == before
    assert len(lengthless(_txn(Project.open(project.root_dir)).snapshot.signed)) == 8


def test_a_bridge_left_by_a_failed_rotation_keeps_the_retired_entries(tmp_path: Path) -> None:
    """review1 (low): a bridged snapshot rotation whose root write failed after the bridge
    (a crash, a lost connection) leaves snapshots signed by the old key *and* the new one,
    listing the retired roles, which devices store. Retried later without the old key (no
    bridge: the usual case when the old key is the reason for the rotation), root N+1 lists
    that new key: no earlier root does, and the latest snapshot (a publish in between, old key
    only) does not verify under it, yet a device still holding the bridged snapshot trusts it
    under root N+1. Dropping the entries then locked that device out of every update."""
    from ota.repository._keyadmin import _sign_here
    from ota.repository._keyspec import KeySpec
    from ota.repository._rootceremony import RootChange, _resign, export_root, publish_root
    from ota.repository._txn import run
    from ota.signing import NewKey

    project = _legacy(tmp_path)
    migrate_layout(project)
    listed = sorted(lengthless(_txn(project).snapshot.signed))
    assert len(listed) == 8
    store = project.storage.local_root()
    assert store is not None
    trusted = (project.root_dir / "root.json").read_bytes()
    new = NewKey.generate("ed25519")
    x = KeySpec(new.public, new.write(tmp_path / "kms", "snapshot-x", public=False))
    old = list(_txn(project).root().signed.roles["snapshot"].keyids)
    change = RootChange(
        add=[("snapshot", x)], remove=[("snapshot", k) for k in old], thresholds={"snapshot": 1}
    )
    md = export_root(project, change)
    assert _sign_here(project, md)
    # the first attempt: publish_root's bridge ran, then the write of root 2 failed
    run(project.storage, project.signers, project.expiry(),
        lambda t: _resign(t, ["snapshot"], md.signed))  # fmt: skip
    with serve_dir(store) as url:
        offline = stock_updater(url, trusted, tmp_path / "offline")
        offline.refresh()  # stores the bridged snapshot (old + new key), listing the bins
        publish_mlp(project, "beta", "1.1.0", seed=4)  # snapshots signed by the old key only
        for keyid in old:  # the retry, on a machine without the old snapshot key
            project.set_signer(keyid, None)
        assert not publish_root(project, md).bridged
        project = Project.open(project.root_dir)
        assert sorted(lengthless(_txn(project).snapshot.signed)) == listed  # kept
        publish_mlp(project, "beta", "1.2.0", seed=5)
        offline = stock_updater(url, trusted, tmp_path / "offline")  # the same folder
        offline.refresh()  # crosses root 2 with its stored bridged snapshot
        assert offline.get_targetinfo(manifest_target_path("beta", "1.2.0")) is not None
