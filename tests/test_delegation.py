"""Team delegations: a team releases only its own models, with its own keys, and devices (the
stock python-tuf client) enforce it; revoking a team key makes devices refuse its releases."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import TargetFile

from ota.bundle import index_target_path, manifest_target_path
from ota.errors import ConfigError, ExitCode, InputError
from ota.repository import Project
from ota.repository._delegate import add_team, add_team_key, list_teams, revoke_team_key
from ota.repository._keyspec import KeySpec, parse_key
from ota.repository._project import generate_p256, key_fingerprint
from ota.repository._trust import read_signers
from ota.repository._txn import Transaction, run
from ota.signing import generate_key
from tests.repo_helpers import make_project, publish_mlp, serve_dir, stock_updater


@dataclass
class Team:
    name: str
    keys: list[KeySpec]  # TUF keys of the team role (private URIs known)
    signing_key: Path  # model-signing P-256 private key
    signing_pub: Path


def add_vision_team(project: Project, keys_dir: Path, *, n_keys: int = 1) -> Team:
    """Delegate ``cam-*`` to team ``vision`` with fresh keys (TUF and model-signing)."""
    keys = []
    for i in range(n_keys):
        uri, key = generate_key(keys_dir, f"vision-{i + 1}")
        keys.append(KeySpec(key, uri))
    sk, sp = keys_dir / "vision-signing.pem", keys_dir / "vision-signing.pub.pem"
    pub = generate_p256(sk, sp)
    # the public half only: the offline targets key holder never needs the team's private key
    public_only = [KeySpec(k.key) for k in keys]
    add_team(project, "vision", ["cam-*"], public_only, 1, [pub])
    return Team("vision", keys, sk, sp)


def team_project(project: Project, team: Team, *, with_keys: bool = True) -> Project:
    """The team's view of the project: its TUF keys, its model-signing key, ``team = vision``."""
    view = Project.open(project.root_dir)
    view.config = replace(
        view.config,
        release_key=str(team.signing_key),
        release_pub=str(team.signing_pub),
        team=team.name,
    )
    if with_keys:
        for k in team.keys:
            assert k.uri is not None
            view.set_signer(k.keyid, k.uri)
    return view


def test_team_release_lives_in_team_role_and_index_in_bins(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4)
    team = add_vision_team(project, tmp_path / "team-keys")
    vision = team_project(project, team)
    publish_mlp(vision, "cam-det", "1.0.0")
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    assert txn.bin_for(manifest_target_path("cam-det", "1.0.0")) == "vision"
    assert txn.bin_for(index_target_path("cam-det")) == "model.cam-det"  # online (ADR 0010)
    assert txn.bin_for(manifest_target_path("other", "1.0.0")) == "archive.dir"  # online
    assert manifest_target_path("cam-det", "1.0.0") in txn.targets("vision").signed.targets
    assert txn.team_roles() == ["vision"] and "vision" in txn.release_roles()
    [info] = list_teams(project)
    assert info.models == ("cam-*",) and info.releases == 1
    assert info.signing_keys == (key_fingerprint(team.signing_pub.read_bytes()),)
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, (project.root_dir / "root.json").read_bytes(), tmp_path / "d")
        updater.refresh()
        assert updater.get_targetinfo(manifest_target_path("cam-det", "1.0.0")) is not None
        assert updater.get_targetinfo(index_target_path("cam-det")) is not None


def test_publishing_a_team_model_needs_the_team_key(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4)
    team = add_vision_team(project, tmp_path / "team-keys")
    no_keys = team_project(project, team, with_keys=False)
    with pytest.raises(ConfigError, match="cannot sign vision"):
        publish_mlp(no_keys, "cam-det", "1.0.0")


def test_team_cannot_publish_outside_its_globs(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4)
    team = add_vision_team(project, tmp_path / "team-keys")
    vision = team_project(project, team)
    with pytest.raises(InputError, match="not a model of team vision"):
        publish_mlp(vision, "lidar", "1.0.0")
    # Without the team setting, the signers list still stops it: the team's signing key is
    # allowed for cam-* only, so devices would refuse the bundle.
    vision.config = replace(vision.config, team="")
    with pytest.raises(InputError, match="not allowed to sign lidar"):
        publish_mlp(vision, "lidar", "1.0.0")
    # And the central publisher (no team key) cannot publish into the team's globs either.
    with pytest.raises(ConfigError, match="cannot sign vision"):
        publish_mlp(project, "cam-det", "1.0.0")

    # Craft what a rogue team tool would write: the team role (validly signed by the team key)
    # listing a release outside its paths, and the online key listing one inside them.
    publish_mlp(vision, "cam-det", "1.0.0")
    real = Transaction.begin(project.storage, project.signers, project.expiry())
    genuine = real.targets("vision").signed.targets[manifest_target_path("cam-det", "1.0.0")]
    outside = manifest_target_path("lidar", "6.6.6")
    inside = manifest_target_path("cam-det", "6.6.6")

    def craft(txn: Transaction) -> None:
        txn.edit("vision").targets[outside] = _copy(genuine, outside)
        online_bin = txn.bin_for(index_target_path("cam-det"))  # model.cam-det, online key
        txn.edit(online_bin).targets[inside] = _copy(genuine, inside)

    run(vision.storage, vision.signers, vision.expiry(), craft)
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, (project.root_dir / "root.json").read_bytes(), tmp_path / "d")
        updater.refresh()
        assert updater.get_targetinfo(manifest_target_path("cam-det", "1.0.0")) is not None
        assert updater.get_targetinfo(outside) is None  # the team role is not trusted for it
        assert updater.get_targetinfo(inside) is None  # the bins are never consulted for cam-*


def _copy(info: TargetFile, path: str) -> TargetFile:
    return TargetFile(info.length, dict(info.hashes), path, dict(info.unrecognized_fields))


def test_revoked_team_key_releases_refused(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4)
    team = add_vision_team(project, tmp_path / "team-keys")
    publish_mlp(team_project(project, team), "cam-det", "1.0.0")
    root = (project.root_dir / "root.json").read_bytes()
    target = manifest_target_path("cam-det", "1.0.0")
    with serve_dir(tmp_path / "repo") as base:
        stock_updater(base, root, tmp_path / "d").refresh()
        with pytest.raises(InputError, match="threshold"):
            revoke_team_key(project, "vision", team.keys[0].keyid)
        revoke_team_key(project, "vision", team.keys[0].keyid, force=True)
        updater = stock_updater(base, root, tmp_path / "d")
        updater.refresh()
        with pytest.raises(UnsignedMetadataError):  # the team role no longer meets threshold
            updater.get_targetinfo(target)
        # The team gets a new key; re-signed with it, the role is trusted again.
        uri, key = generate_key(tmp_path / "team-keys", "vision-new")
        add_team_key(project, "vision", KeySpec(key))
        vision = team_project(project, replace(team, keys=[KeySpec(key, uri)]))
        publish_mlp(vision, "cam-det", "1.1.0", seed=1)
        updater = stock_updater(base, root, tmp_path / "d")
        updater.refresh()
        assert updater.get_targetinfo(manifest_target_path("cam-det", "1.1.0")) is not None
        assert updater.get_targetinfo(target) is not None


def test_team_name_and_glob_validation(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4)
    _uri, key = generate_key(tmp_path / "k", "t")
    spec = KeySpec(key)
    for bad in ("releases", "bins-x", "Targets", "root"):
        with pytest.raises(InputError):
            add_team(project, bad, ["x-*"], [spec], 1)
    with pytest.raises(InputError):
        add_team(project, "t", ["a/b"], [spec], 1)
    with pytest.raises(InputError):
        add_team(project, "t", ["x-*"], [spec], 2)
    publish_mlp(project, "x-old", "1.0.0")
    with pytest.raises(InputError, match="published models match"):
        add_team(project, "t", ["x-*"], [spec], 1)
    add_team(project, "t", ["y-*"], [spec], 1)
    with pytest.raises(InputError, match="already delegated"):
        add_team(project, "u", ["y-*"], [spec], 1)


def test_delegate_cli(tmp_path: Path) -> None:
    from ota.cli._key_cmds import register
    from ota.cli._main import _register, cli

    _register()
    register(cli)
    project = make_project(tmp_path, bins=4)
    uri, key = generate_key(tmp_path / "k", "audio-1")
    pub = tmp_path / "k" / "audio-1.pub.pem"
    from ota.signing import public_key_pem

    pub.write_bytes(public_key_pem(key))
    generate_p256(tmp_path / "k" / "s.pem", tmp_path / "k" / "s.pub.pem")
    runner = CliRunner()
    proj = ["--project", str(project.root_dir)]
    res = runner.invoke(
        cli,
        ["delegate", "add", "audio", "--models", "mic-*", "--models", "spk-*", "--key", str(pub),
         "--signing-key", str(tmp_path / "k" / "s.pub.pem"), *proj, "--json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["models"] == ["mic-*", "spk-*"]
    res = runner.invoke(cli, ["delegate", "list", *proj, "--json"])
    [team] = json.loads(res.output)
    assert team["keyids"] == [key.keyid]
    assert parse_key(str(pub)).keyid == key.keyid == parse_key(uri).keyid
    res = runner.invoke(cli, ["delegate", "revoke-key", "audio", key.keyid[:12], *proj])
    assert res.exit_code == ExitCode.INPUT and "threshold" in res.output
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    assert {e.models for e in read_signers(project, txn)} == {("*",), ("mic-*", "spk-*")}


def test_gc_keeps_blobs_of_team_releases(tmp_path: Path) -> None:
    """gc walks every role that holds releases (team roles too), not only the online bins."""
    from ota.bundle import blob_key
    from ota.repository import gc
    from ota.repository._index import load_manifest

    project = make_project(tmp_path, bins=4)
    team = add_vision_team(project, tmp_path / "team-keys")
    publish_mlp(team_project(project, team), "cam-det", "1.0.0")
    result = gc(project, grace_seconds=0)
    assert result.deleted == 0
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    manifest = load_manifest(project.storage, txn, "cam-det", "1.0.0")
    for digest in manifest.chunk_digests():
        assert project.storage.exists(blob_key(digest))
