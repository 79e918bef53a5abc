"""Root ceremony with 2-of-3 root keys kept off the online machine: export, sign elsewhere,
publish; python-tuf refuses (and nothing is written) when a threshold is not met."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from ota.errors import ExitCode
from ota.repository import Project
from ota.signing import generate_key, public_key_pem
from tests.repo_helpers import make_project, publish_mlp, serve_dir, stock_updater


def _cli(args: list[str]) -> tuple[int, str]:
    from ota.cli._key_cmds import register
    from ota.cli._main import _register, cli

    _register()
    register(cli)
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    return res.exit_code, res.output


def offline_root_project(tmp: Path) -> tuple[Project, Path, list[str]]:
    """A 2-of-3 root project whose root keys were moved to ``tmp/offline-machine``.

    Returns the project, that folder, and the root key ids in order (root-1, -2, -3).
    """
    project = make_project(tmp, bins=4, root_keys=3, root_threshold=2)
    machine = tmp / "offline-machine"
    shutil.move(project.root_dir / "keys" / "offline", machine)
    root = json.loads((project.root_dir / "root.json").read_bytes())["signed"]
    keyids = list(root["roles"]["root"]["keyids"])
    by_file = {}
    for keyid in keyids:
        uri = project.config.signers[keyid]
        by_file[Path(uri.split(":", 1)[1]).name] = keyid
        project.set_signer(keyid, None)
    targets_id = root["roles"]["targets"]["keyids"][0]
    project.set_signer(targets_id, f"file2:{machine / 'targets.pem'}")
    project.save_config()
    return Project.open(project.root_dir), machine, [by_file[f"root-{i}.pem"] for i in (1, 2, 3)]


def _metadata(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((repo / "metadata").glob("*.json"))}


def test_two_of_three_ceremony_and_client_follows(tmp_path: Path) -> None:
    project, machine, (k1, _k2, k3) = offline_root_project(tmp_path)
    publish_mlp(project, "m", "1.0.0")
    original_root = (project.root_dir / "root.json").read_bytes()
    # A new root key (its holder sends the public half), replacing root-3.
    _uri, new_key = generate_key(tmp_path / "new-holder", "root-4")
    pub = tmp_path / "root-4.pub.pem"
    pub.write_bytes(public_key_pem(new_key))
    new_root = tmp_path / "root-2.json"
    proj = ["--project", str(project.root_dir)]
    code, out = _cli(
        ["root", "export", "--out", str(new_root), "--add-key", "root", str(pub),
         "--remove-key", "root", k3[:12], "--expires-days", "200", *proj]
    )
    assert code == 0, out
    assert json.loads(new_root.read_bytes())["signatures"] == []
    before = _metadata(tmp_path / "repo")

    # One signature on the offline machine: under both thresholds, refused, nothing written.
    code, out = _cli(["root", "sign", str(new_root), "--key", f"file2:{machine / 'root-1.pem'}"])
    assert code == 0, out
    code, out = _cli(["root", "publish", str(new_root), *proj])
    assert code == ExitCode.SECURITY and "threshold" in out, out
    assert _metadata(tmp_path / "repo") == before

    # A second holder signs their own copy; publish merges both files.
    copy = tmp_path / "root-2.copy.json"
    code, out = _cli(["root", "sign", str(new_root), "--key", f"file2:{machine / 'root-2.pem'}",
                      "--out", str(copy)])
    assert code == 0, out
    code, out = _cli(["root", "publish", str(new_root), str(copy), *proj, "--json"])
    assert code == 0, out
    assert json.loads(out)["version"] == 2
    assert (tmp_path / "repo" / "metadata" / "2.root.json").exists()
    published = json.loads((tmp_path / "repo" / "metadata" / "root.json").read_bytes())
    assert k3 not in published["signed"]["roles"]["root"]["keyids"]
    assert k1 in published["signed"]["roles"]["root"]["keyids"]

    publish_mlp(project, "m", "1.1.0", seed=1)
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, original_root, tmp_path / "device")
        updater.refresh()  # follows 1 -> 2 with python-tuf's root rotation rules
        assert updater.get_targetinfo("releases/m/1.1.0.json") is not None
    trusted = json.loads((tmp_path / "device" / "metadata" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 2


def test_new_keys_alone_cannot_replace_root(tmp_path: Path) -> None:
    """Signatures by the new root's keys only: the old root's threshold is not met."""
    project, machine, keyids = offline_root_project(tmp_path)
    pubs = []
    for i in range(3):
        _u, key = generate_key(tmp_path / "attacker", f"r{i}")
        p = tmp_path / f"r{i}.pub.pem"
        p.write_bytes(public_key_pem(key))
        pubs.append(p)
    new_root = tmp_path / "evil.json"
    args = ["root", "export", "--out", str(new_root), "--project", str(project.root_dir)]
    for p in pubs:
        args += ["--add-key", "root", str(p)]
    for k in keyids:
        args += ["--remove-key", "root", k]
    assert _cli(args)[0] == 0
    for i in range(2):
        attacker_key = tmp_path / "attacker" / f"r{i}.pem"
        _cli(["root", "sign", str(new_root), "--key", f"file2:{attacker_key}"])
    before = _metadata(tmp_path / "repo")
    code, out = _cli(["root", "publish", str(new_root), "--project", str(project.root_dir)])
    assert code == ExitCode.SECURITY and "current root" in out, out
    # one old key added to the two new ones is still under the old threshold (2)
    _cli(["root", "sign", str(new_root), "--key", f"file2:{machine / 'root-1.pem'}"])
    code, out = _cli(["root", "publish", str(new_root), "--project", str(project.root_dir)])
    assert code == ExitCode.SECURITY, out
    assert _metadata(tmp_path / "repo") == before


def test_stale_or_tampered_root_refused(tmp_path: Path) -> None:
    project, machine, _ = offline_root_project(tmp_path)
    keys = [f"file2:{machine / f'root-{i}.pem'}" for i in (1, 2)]
    proj = ["--project", str(project.root_dir)]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for f, days in ((first, "300"), (second, "100")):
        assert _cli(["root", "export", "--out", str(f), "--expires-days", days, *proj])[0] == 0
        _cli(["root", "sign", str(f), "--key", keys[0], "--key", keys[1]])
    # tampered after signing: python-tuf finds no valid signature
    doc = json.loads(second.read_bytes())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    tampered = tmp_path / "t.json"
    tampered.write_text(json.dumps(doc))
    code, out = _cli(["root", "publish", str(tampered), *proj])
    assert code == ExitCode.SECURITY, out
    assert _cli(["root", "publish", str(first), *proj])[0] == 0
    # b.json was exported from root 1 too: it does not chain onto root 2
    code, out = _cli(["root", "publish", str(second), *proj])
    assert code == ExitCode.INPUT and "do not chain" in out, out
    code, out = _cli(["root", "publish", str(first), str(second), *proj])
    assert code == ExitCode.INPUT and "different root" in out, out


def test_rotate_without_root_keys_writes_unsigned_root(tmp_path: Path) -> None:
    """`ota key rotate timestamp` on the online machine: the new key is generated and recorded,
    the new root awaits the ceremony; until it is published, the old key keeps signing."""
    project, machine, _ = offline_root_project(tmp_path)
    proj = ["--project", str(project.root_dir)]
    out_file = tmp_path / "rot.json"
    code, out = _cli(["key", "rotate", "timestamp", "--out", str(out_file), *proj, "--json"])
    assert code == 0, out
    res = json.loads(out)
    assert res["root_published"] is False and res["unsigned_root"] == str(out_file)
    publish_mlp(Project.open(project.root_dir), "m", "1.0.0")  # still signs with the old key
    keys = [arg for i in (2, 3) for arg in ("--key", f"file2:{machine / f'root-{i}.pem'}")]
    assert _cli(["root", "sign", str(out_file), *keys])[0] == 0
    code, out = _cli(["root", "publish", str(out_file), *proj, "--json"])
    assert code == 0, out
    assert json.loads(out)["resigned"] == ["timestamp"]
    ts = json.loads((tmp_path / "repo" / "metadata" / "timestamp.json").read_bytes())
    assert [s["keyid"] for s in ts["signatures"]] == [res["new_keyid"]]
    with serve_dir(tmp_path / "repo") as base:
        original = (tmp_path / "repo" / "metadata" / "1.root.json").read_bytes()
        updater = stock_updater(base, original, tmp_path / "device")
        updater.refresh()
        assert updater.get_targetinfo("releases/m/1.0.0.json") is not None


def test_sign_refuses_online_key_uris(tmp_path: Path) -> None:
    code, out = _cli(["root", "sign", str(tmp_path / "x.json"), "--key", "awskms:abc"])
    assert code == ExitCode.USAGE  # the file does not exist: click refuses before anything
    (tmp_path / "x.json").write_text("{}")
    code, out = _cli(["root", "sign", str(tmp_path / "x.json"), "--key", "file2:/nope"])
    assert code == ExitCode.INPUT, out
