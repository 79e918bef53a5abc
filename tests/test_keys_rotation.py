"""The key rotation drill, revocations and `ota refresh`, with devices bootstrapped from the
ORIGINAL root following every step.

Two device-side verifiers watch the drill: the project's own updater (``ota.client``:
``update_once`` with a real install, smoke test and model-signing check) and the stock
python-tuf ``Updater`` (to observe TUF's own refusals, e.g. an unmet team threshold).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tuf.api.exceptions import UnsignedMetadataError

from ota.client import init_device, update_once
from ota.client._fetch import FetchConfig
from ota.errors import InputError
from ota.repository import Project
from ota.repository._delegate import add_team_key, revoke_team_key
from ota.repository._keyadmin import list_keys, refresh, revoke, rotate
from ota.repository._keyspec import KeySpec
from ota.repository._project import generate_p256, key_fingerprint
from ota.repository._rootceremony import (
    RootChange,
    export_root,
    merge_signatures,
    publish_root,
    sign_root_file,
    write_root_file,
)
from ota.repository._txn import Expiry, Transaction
from ota.signing import generate_key
from tests.repo_helpers import make_project, publish_mlp, serve_dir, stock_updater
from tests.test_delegation import add_vision_team, team_project

FAST = FetchConfig(connect_timeout=2.0, read_timeout=2.0, retries=2, backoff=0.01,
                   backoff_max=0.05)


class Device:
    """The project's updater, bootstrapped once with the original root."""

    def __init__(self, state: Path, url: str, root: bytes) -> None:
        self.state = state
        init_device(state, url, root, "dev-1", ["m", "cam-det"], ring="canary",
                    health_timeout_s=0)

    def update(self, model: str) -> Any:
        return update_once(self.state, model=model, fetch_config=FAST).outcomes[0]

    def expect(self, model: str, status: str, version: str | None = None) -> None:
        out = self.update(model)
        assert out.status == status, out.to_dict()
        if version is not None:
            assert out.version == version, out.to_dict()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Project, str]]:
    project = make_project(tmp_path, bins=4, root_keys=3, root_threshold=2)
    with serve_dir(tmp_path / "repo") as base:
        yield project, base


def _timestamp_signers(repo: Path) -> list[str]:
    doc = json.loads((repo / "metadata" / "timestamp.json").read_bytes())
    return [s["keyid"] for s in doc["signatures"]]


@pytest.mark.slow
def test_full_rotation_drill(tmp_path: Path, served: tuple[Project, str]) -> None:
    project, base = served
    original = (project.root_dir / "root.json").read_bytes()
    publish_mlp(project, "m", "1.0.0")
    device = Device(tmp_path / "device", base, original)
    device.expect("m", "updated", "1.0.0")
    stock = stock_updater(base, original, tmp_path / "stock")
    stock.refresh()

    # 1. online keys: timestamp and snapshot (new roots, signed here), bins (one transaction)
    for role in ("timestamp", "snapshot", "bins"):
        change = rotate(project, role)
        assert change.root_published == (role != "bins"), change
        project = Project.open(project.root_dir)
        device.expect("m", "up_to_date")
    assert _timestamp_signers(tmp_path / "repo") == [
        k.keyid for k in list_keys(project) if k.roles == ("timestamp",)
    ]
    # 2. the offline targets key
    rotate(project, "targets")
    project = Project.open(project.root_dir)
    device.expect("m", "up_to_date")

    # 3. root 2-of-3: the root keys leave this machine; root-3 is replaced by a new key
    machine = tmp_path / "offline-machine"
    machine.mkdir()
    root_ids = [k.keyid for k in list_keys(project) if k.roles == ("root",)]
    for keyid in root_ids:
        path = Path(project.config.signers[keyid].split(":", 1)[1])
        shutil.move(project.abspath(str(path)), machine / path.name)
        project.set_signer(keyid, None)
    project.save_config()
    project = Project.open(project.root_dir)
    _u, new_root_key = generate_key(tmp_path / "holder-4", "root-4")
    removed = json.loads((tmp_path / "repo" / "metadata" / "1.root.json").read_bytes())
    root3 = removed["signed"]["roles"]["root"]["keyids"][2]
    md = export_root(project, RootChange(add=[("root", KeySpec(new_root_key))],
                                         remove=[("root", root3)]))
    unsigned = tmp_path / "ceremony.json"
    write_root_file(md, unsigned)
    pems = sorted(machine.glob("root-*.pem"))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    sign_root_file(unsigned, [f"file2:{pems[0]}"], a)  # holder 1, on their machine
    sign_root_file(unsigned, [f"file2:{pems[1]}"], b)  # holder 2, on theirs
    publish_root(project, merge_signatures([a, b]))
    device.expect("m", "up_to_date")

    # 4. a team key: delegate, publish, rotate (add the new key, revoke the old one)
    team = add_vision_team(project, tmp_path / "team-keys")
    publish_mlp(team_project(project, team), "cam-det", "1.0.0")
    device.expect("cam-det", "updated", "1.0.0")
    uri, key2 = generate_key(tmp_path / "team-keys", "vision-2")
    add_team_key(project, "vision", KeySpec(key2))
    revoke_team_key(project, "vision", team.keys[0].keyid)
    stock = stock_updater(base, original, tmp_path / "stock")  # same cache, a new session
    stock.refresh()  # the team role is still signed by the revoked key only
    with pytest.raises(UnsignedMetadataError):
        stock.get_targetinfo("releases/cam-det/1.0.0.json")
    vision = team_project(project, replace(team, keys=[KeySpec(key2, uri)]))
    publish_mlp(vision, "cam-det", "1.1.0", seed=1)  # signs the team role with the new key

    # 5. releases after the drill reach the device that only ever trusted root 1
    publish_mlp(project, "m", "2.0.0", seed=2)
    device.expect("m", "updated", "2.0.0")
    device.expect("cam-det", "updated", "1.1.0")
    fresh = stock_updater(base, original, tmp_path / "fresh")
    fresh.refresh()
    info = fresh.get_targetinfo("releases/m/2.0.0.json")
    assert info is not None
    fresh.download_target(info, str(tmp_path / "m-2.0.0.json"))
    trusted = json.loads((tmp_path / "fresh" / "metadata" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 5  # 1 + timestamp, snapshot, targets, ceremony


def test_revoked_model_signing_key_refused_by_device(
    tmp_path: Path, served: tuple[Project, str]
) -> None:
    project, base = served
    team = add_vision_team(project, tmp_path / "team-keys")
    vision = team_project(project, team)
    publish_mlp(vision, "cam-det", "1.0.0")
    device = Device(tmp_path / "device", base, (project.root_dir / "root.json").read_bytes())
    device.expect("cam-det", "updated", "1.0.0")
    publish_mlp(vision, "cam-det", "1.1.0", seed=1)  # signed by the soon-revoked key
    old = key_fingerprint(team.signing_pub.read_bytes())
    with pytest.raises(InputError, match="without a signer"):
        revoke(project, old)
    new_pub = generate_p256(tmp_path / "team-keys" / "s2.pem", tmp_path / "team-keys" / "s2.pub")
    change = revoke(project, old[:12], signing_replacement=new_pub)
    assert "trust/signers.json" in change.actions[0]
    out = device.update("cam-det")  # 1.1.0 is validly listed by TUF, but signed by a revoked key
    assert out.status == "security", out.to_dict()
    # the publisher refuses the revoked key too
    with pytest.raises(InputError, match="not allowed to sign"):
        publish_mlp(vision, "cam-det", "1.2.0", seed=2)
    vision.config = replace(vision.config, release_key=str(tmp_path / "team-keys" / "s2.pem"),
                            release_pub=str(tmp_path / "team-keys" / "s2.pub"))
    publish_mlp(vision, "cam-det", "1.2.0", seed=2)
    device.expect("cam-det", "updated", "1.2.0")


def test_revoke_online_and_root_listed_keys(tmp_path: Path, served: tuple[Project, str]) -> None:
    project, base = served
    publish_mlp(project, "m", "1.0.0")
    original = (project.root_dir / "root.json").read_bytes()
    bins_id = next(k.keyid for k in list_keys(project) if k.roles == ("bins",))
    ts_id = next(k.keyid for k in list_keys(project) if k.roles == ("timestamp",))
    with pytest.raises(InputError, match="replacement"):
        revoke(project, bins_id)
    uri, new_bins = generate_key(tmp_path / "k", "bins-new")
    revoke(project, bins_id, replacement=KeySpec(new_bins, uri))
    uri, new_ts = generate_key(tmp_path / "k", "ts-new")
    change = revoke(project, ts_id, replacement=KeySpec(new_ts, uri))
    assert change.root_published
    project = Project.open(project.root_dir)
    assert bins_id not in project.config.signers and ts_id not in project.config.signers
    assert {k.keyid for k in list_keys(project)} >= {new_bins.keyid, new_ts.keyid}
    publish_mlp(project, "m", "1.1.0", seed=1)
    updater = stock_updater(base, original, tmp_path / "stock")
    updater.refresh()
    assert updater.get_targetinfo("releases/m/1.1.0.json") is not None
    assert _timestamp_signers(tmp_path / "repo") == [new_ts.keyid]


def _expiries(project: Project) -> dict[str, datetime]:
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    out = {r: txn.targets(r).signed.expires for r in txn.online_roles()}
    return out | {"snapshot": txn.snapshot.signed.expires,
                  "timestamp": txn.timestamp.signed.expires}


def test_refresh_moves_expiries_and_is_idempotent(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4, expiry=Expiry(bins=3, snapshot=2, timestamp=1))
    publish_mlp(project, "m", "1.0.0")
    before = _expiries(project)
    assert refresh(project).resigned == []  # nothing within half its lifetime
    assert _expiries(project) == before
    result = refresh(project, within_days=1.5)  # timestamp (1 day) only
    assert result.resigned == ["timestamp"]
    after = _expiries(project)
    assert after["timestamp"] >= before["timestamp"] and after["snapshot"] == before["snapshot"]
    project.config = replace(project.config, expiry=Expiry(bins=30, snapshot=7, timestamp=2))
    result = refresh(project, within_days=10)
    assert set(result.resigned) == set(before)
    moved = _expiries(project)
    assert all(moved[r] > before[r] for r in before), (before, moved)
    assert moved["model.m"] > datetime.now(UTC).replace(microsecond=0) + Expiry().for_role("x") / 2
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, (project.root_dir / "root.json").read_bytes(), tmp_path / "d")
        updater.refresh()
        assert updater.get_targetinfo("releases/m/1.0.0.json") is not None


def test_refresh_cli_from_cron(tmp_path: Path) -> None:
    from ota.cli._key_cmds import register
    from ota.cli._main import _register, cli

    _register()
    register(cli)
    project = make_project(tmp_path, bins=4)
    args = ["refresh", "--project", str(project.root_dir)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "nothing due" in res.output, res.output
    res = CliRunner().invoke(cli, [*args, "--within-days", "400", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert "timestamp" in doc["resigned"] and "archive.dir" in doc["resigned"]
    assert any(w.startswith("targets expires") for w in doc["warnings"])
