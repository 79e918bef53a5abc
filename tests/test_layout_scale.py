"""ADR 0010: per-model roles, the self-splitting archive, and ``ota migrate-layout``.

Everything here is checked by the stock python-tuf ``ngclient.Updater`` (tuf 7.0.1) over real
HTTP, or by the real device client: every target of the repository must be found and
downloaded with its hashes verified, before and after a migration, and a device that holds the
metadata of the old layout must keep updating.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from functools import partial
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tuf.api.metadata import TargetFile

from ota.bundle import manifest_target_path
from ota.client import init_device, update_once
from ota.client._fetch import FetchConfig, make_pool
from ota.client._tuf import TufSession
from ota.errors import SecurityError
from ota.repository import Project
from ota.repository._index import archive_put, ensure_model_role
from ota.repository._keyadmin import list_keys, revoke
from ota.repository._keyspec import KeySpec
from ota.repository._meta import ARCHIVE_SEGMENT_PREFIX, model_role
from ota.repository._migrate import migrate_layout
from ota.repository._project import put_target_file
from ota.repository._txn import Transaction, run
from ota.signing import generate_key
from tests.repo_helpers import make_project, publish_mlp, serve_dir, stock_updater
from tests.updater_world import FAST


def _txn(project: Project) -> Transaction:
    return Transaction.begin(project.storage, project.signers, project.expiry())


def _every_target(project: Project) -> dict[str, str]:
    """Every target path of the repository -> the role that lists it (walked by name)."""
    txn = _txn(project)
    out = dict.fromkeys(txn.targets().signed.targets, "targets")
    for role in txn.release_roles():
        for path in txn.targets(role).signed.targets:
            out[path] = role
    return out


def _stock_verifies_all(project: Project, work: Path, paths: dict[str, str]) -> None:
    """A fresh stock Updater finds each target where python-tuf looks, and downloads it
    (python-tuf checks its length and hashes)."""
    root = project.storage.local_root()
    assert root is not None
    trusted = (project.root_dir / "root.json").read_bytes()
    with serve_dir(root) as url:
        updater = stock_updater(url, trusted, work)
        updater.refresh()
        for path in paths:
            info = updater.get_targetinfo(path)
            assert info is not None, path
            updater.download_target(info, str(work / "dl"))


def _max_live(project: Project, n: int) -> Project:
    project.config = replace(project.config, max_live_releases=n)
    project.save_config()
    return Project.open(project.root_dir)


def test_stock_client_verifies_every_target_of_the_per_model_layout(tmp_path: Path) -> None:
    project = _max_live(make_project(tmp_path), 2)
    for v in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        publish_mlp(project, "alpha", v)
    publish_mlp(project, "beta", "1.0.0")
    txn = _txn(project)
    roles = set(txn.online_roles())
    assert {model_role("alpha"), model_role("beta"), "archive.dir"} <= roles
    assert not any(r.startswith("bins-") for r in txn.snapshot.signed.meta)
    # the index window (2) is in the model role, older releases in the archive
    assert txn.find(manifest_target_path("alpha", "1.3.0")) == model_role("alpha")
    assert txn.find("index/alpha.json") == model_role("alpha")
    old = txn.find(manifest_target_path("alpha", "1.0.0"))
    assert old is not None
    assert old.startswith(ARCHIVE_SEGMENT_PREFIX)
    # every role a client can reach is in the snapshot (python-tuf refuses one that is not)
    assert txn.all_targets_roles()[:2] == ["targets", "releases"]
    assert all(f"{r}.json" in txn.snapshot.signed.meta for r in txn.all_targets_roles())
    paths = _every_target(project)
    assert len([p for p in paths if p.startswith("releases/")]) == 5
    _stock_verifies_all(project, tmp_path / "stock", paths)


def test_archive_segments_split_and_stay_verifiable(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    publish_mlp(project, "alpha", "1.0.0")
    infos = []
    for i in range(40):  # archived releases of an old model (hash and length of real bytes)
        path = manifest_target_path("gamma", f"0.{i}.0")
        infos.append(put_target_file(project.storage, path, f"manifest {i}".encode()))

    def change(txn: Transaction, batch: list[TargetFile]) -> None:
        ensure_model_role(txn, "gamma")
        for info in batch:
            archive_put(txn, info.path, info, cap=8)  # a small cap forces two levels of splits

    # 8 fill the first segment (committed), 32 more split it, then split one of its children
    for batch in (infos[:8], infos[8:]):
        run(project.storage, project.signers, project.expiry(), partial(change, batch=batch))
    txn = _txn(project)
    segments = [r for r in txn.online_roles() if r.startswith(ARCHIVE_SEGMENT_PREFIX)]
    assert len(segments) >= 16
    assert all(len(txn.targets(s).signed.targets) <= 8 for s in segments)
    # the split segment is retired: still listed (python-tuf forbids dropping it), no length
    retired = txn.snapshot.signed.meta[f"{ARCHIVE_SEGMENT_PREFIX}.json"]
    assert retired.length is None
    assert f"{ARCHIVE_SEGMENT_PREFIX}" not in txn.online_roles()
    _stock_verifies_all(project, tmp_path / "stock", {i.path: "" for i in infos})


def _device(tmp: Path, url: str, project: Project, models: list[str]) -> Path:
    dev = tmp / "dev"
    trusted = (project.root_dir / "root.json").read_bytes()
    init_device(dev, url, trusted, "dev-1", models, ring="canary", health_timeout_s=0)
    return dev


def test_migration_keeps_old_devices_updating(tmp_path: Path) -> None:
    project = _max_live(make_project(tmp_path, bins=8, legacy_bins=True), 2)
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        publish_mlp(project, "alpha", v)
    publish_mlp(project, "beta", "1.0.0")
    assert _txn(project).legacy_layout()
    before = _every_target(project)
    assert all(r.startswith("bins-") for p, r in before.items() if p.startswith("releases/"))
    root = project.storage.local_root()
    assert root is not None
    with serve_dir(root) as url:
        dev = _device(tmp_path, url, project, ["alpha"])
        res = update_once(dev, fetch_config=FAST)
        assert res.outcomes[0].status == "updated", res.to_dict()
        stock_work = tmp_path / "stock-old"
        old_stock = stock_updater(url, (project.root_dir / "root.json").read_bytes(), stock_work)
        old_stock.refresh()  # a stock client holding the old snapshot and bins

        out = CliRunner().invoke(
            _cli(), ["migrate-layout", "--project", str(project.root_dir), "--json"]
        )
        assert out.exit_code == 0, out.output
        doc = json.loads(out.output)
        assert doc["migrated"] is True
        assert doc["models"] == 2
        assert doc["retired_bins"] == 8
        assert doc["live_releases"] == 3  # alpha 1.1.0, 1.2.0; beta 1.0.0
        assert doc["archived_releases"] == 1

        txn = _txn(project)
        assert not txn.legacy_layout()
        for b in txn.snapshot.signed.meta:  # retired bins: one common version, no length
            if b.startswith("bins-"):
                assert txn.snapshot.signed.meta[b].length is None
        assert (
            len({m.version for n, m in txn.snapshot.signed.meta.items() if n.startswith("bins-")})
            == 1
        )
        assert all(f"{r}.json" in txn.snapshot.signed.meta for r in txn.all_targets_roles())
        after = _every_target(project)
        assert set(after) == set(before)
        assert not any(r.startswith("bins-") for r in after.values())

        # the stock client that held the old metadata refreshes and finds everything
        old_stock2 = stock_updater(url, (project.root_dir / "root.json").read_bytes(), stock_work)
        old_stock2.refresh()
        for path in after:
            assert old_stock2.get_targetinfo(path) is not None, path

        # the device with the old metadata: up to date, then takes a release published after
        res = update_once(dev, fetch_config=FAST)
        assert res.outcomes[0].status == "up_to_date", res.to_dict()
        publish_mlp(project, "alpha", "1.3.0", seed=3)
        res = update_once(dev, fetch_config=FAST)
        assert res.outcomes[0].status == "updated", res.to_dict()
        assert res.outcomes[0].version == "1.3.0"

    # idempotent: a second run changes nothing
    head = (root / "metadata" / "timestamp.json").read_bytes()
    again = migrate_layout(Project.open(project.root_dir))
    assert again.migrated is False
    assert (root / "metadata" / "timestamp.json").read_bytes() == head
    _stock_verifies_all(project, tmp_path / "stock-new", _every_target(project))


_KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from ota.repository import Project
    from ota.repository import _txn
    from ota.repository._migrate import migrate_layout

    real = _txn.Transaction._write_versioned
    count = 0

    def dying(self, md, role):
        global count
        count += 1
        out = real(self, md, role)
        if sys.argv[2] in (str(count), role):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    _txn.Transaction._write_versioned = dying
    migrate_layout(Project.open(Path(sys.argv[1])))
    sys.exit(3)  # the seam was never reached
    """
)


def test_a_migration_killed_midway_changes_nothing_and_reruns(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4, legacy_bins=True)
    publish_mlp(project, "alpha", "1.0.0")
    root = project.storage.local_root()
    assert root is not None
    before = _every_target(project)
    head = (root / "metadata" / "timestamp.json").read_bytes()
    for kill_after in ("1", "snapshot"):  # after the first role file; after the snapshot
        proc = subprocess.run(
            [sys.executable, "-c", _KILL_CHILD, str(project.root_dir), kill_after],
            capture_output=True,
            cwd=Path(__file__).parent.parent,
            check=False,
        )
        assert proc.returncode == -9, proc.stderr.decode()[-2000:]
        assert (root / "metadata" / "timestamp.json").read_bytes() == head
        assert _txn(project).legacy_layout()
        _stock_verifies_all(project, tmp_path / f"stock-{kill_after}", before)
    assert migrate_layout(Project.open(project.root_dir)).migrated
    assert set(_every_target(project)) == set(before)
    _stock_verifies_all(project, tmp_path / "stock-after", before)


def _cli() -> click.Group:
    from ota.cli._main import _register, cli

    _register()
    return cli


class _GzipServer:
    """A static server over a repository folder (real HTTP on 127.0.0.1) that records each
    request's ``Accept-Encoding`` and answers snapshot requests with ``Content-Encoding: gzip``:
    honestly (the file, compressed, even to a client that did not ask) or as a bomb (64 MiB of
    spaces compressed to ~64 KB)."""

    def __init__(self, root: Path, bomb: bool) -> None:
        import http.server
        import threading

        self.seen: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                outer.seen.append((path, self.headers.get("Accept-Encoding", "")))
                file = root / path.lstrip("/")
                if ".." in path or not file.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = file.read_bytes()
                gz = path.endswith(".snapshot.json")
                if gz:
                    body = gzip.compress(b" " * (64 << 20) if bomb else body, 6)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                if gz:
                    self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> _GzipServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _session(project: Project, url: str, work: Path) -> TufSession:
    cfg = FetchConfig(retries=0)
    return TufSession(work / "metadata", work / "cache", url,
                      (project.root_dir / "root.json").read_bytes(), pool=make_pool(cfg),
                      fetch_cfg=cfg)  # fmt: skip


def test_gzip_is_asked_for_growing_metadata_only_and_verified_decoded(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    publish_mlp(project, "alpha", "1.0.0")
    root = project.storage.local_root()
    assert root is not None
    with _GzipServer(root, bomb=False) as srv:
        session = _session(project, srv.url, tmp_path / "dev")
        session.refresh()
        assert session.index("alpha") is not None
        asked = {p.rsplit("/", 1)[-1]: enc for p, enc in srv.seen}
        assert asked["timestamp.json"] == "identity"  # the idle poll's requests: unchanged
        assert asked["2.root.json"] == "identity"
        assert all(enc == "gzip" for n, enc in asked.items() if n[0].isdigit() and
                   not n.endswith(".root.json")), asked  # fmt: skip
        # the stock client asks for nothing, is sent gzip anyway, and verifies the decoded bytes
        stock = stock_updater(srv.url, (project.root_dir / "root.json").read_bytes(),
                              tmp_path / "stock")  # fmt: skip
        stock.refresh()
        assert stock.get_targetinfo(manifest_target_path("alpha", "1.0.0")) is not None


def test_a_gzip_bomb_in_place_of_the_snapshot_is_cut_at_its_signed_length(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path)
    publish_mlp(project, "alpha", "1.0.0")
    root = project.storage.local_root()
    assert root is not None
    with _GzipServer(root, bomb=True) as srv:
        session = _session(project, srv.url, tmp_path / "dev")
        with pytest.raises(SecurityError, match=r"endless data|length"):
            session.refresh()


def test_rotating_the_online_key_resigns_model_roles_and_archive(tmp_path: Path) -> None:
    project = _max_live(make_project(tmp_path), 1)
    publish_mlp(project, "alpha", "1.0.0")
    publish_mlp(project, "alpha", "1.1.0", seed=1)  # 1.0.0 moves to the archive
    bins_id = next(k.keyid for k in list_keys(project) if k.roles == ("bins",))
    uri, new_bins = generate_key(tmp_path / "k", "bins-new")
    revoke(project, bins_id, replacement=KeySpec(new_bins, uri))
    project = Project.open(project.root_dir)
    publish_mlp(project, "alpha", "1.2.0", seed=2)
    txn = _txn(project)
    root = project.storage.local_root()
    assert root is not None
    for role in txn.online_roles():  # every online role is signed by the new key alone
        meta = txn.snapshot.signed.meta[f"{role}.json"]
        doc = json.loads((root / "metadata" / f"{meta.version}.{role}.json").read_bytes())
        assert [s["keyid"] for s in doc["signatures"]] == [new_bins.keyid], role
    assert any(r.startswith(ARCHIVE_SEGMENT_PREFIX) for r in txn.online_roles())
    _stock_verifies_all(project, tmp_path / "stock", _every_target(project))
