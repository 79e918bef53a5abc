"""Issue 12, items 15-17: keys are checked before anything is written, rotations are
all-or-nothing, the runbook's forms work with ``keys/offline/`` moved off the machine, and
``ota key generate`` makes the right key for each role.

Every refusal is checked against a snapshot of the whole storage folder and the whole project
folder (``ota.toml``, key files): nothing may change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ota.cli._main import _register, cli
from ota.errors import ExitCode
from ota.repository import Project
from ota.repository._keyadmin import list_keys
from tests.repo_helpers import make_project, publish_mlp, serve_dir, stock_updater

_register()


def _ota(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def _tree(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` (path -> sha256 and mode): the state a refusal must keep."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p)] = f"{digest} {stat.S_IMODE(p.stat().st_mode):o}"
    return out


def _keyid(project: Project, role: str) -> str:
    return next(r.keyid for r in list_keys(project) if r.roles == (role,))


@pytest.fixture
def proj(tmp_path: Path) -> Project:
    project = make_project(tmp_path, bins=4)
    publish_mlp(project, "m", "1.0.0")
    return project


def _move_offline(project: Project, tmp_path: Path) -> Path:
    away = tmp_path / "offline-box"
    shutil.move(project.root_dir / "keys" / "offline", away)
    return away


def test_key_list_says_moved_offline_keys_do_not_sign_here(proj: Project, tmp_path: Path) -> None:
    _move_offline(proj, tmp_path)
    res = _ota("key", "list", "--project", str(proj.root_dir), "--json")
    assert res.exit_code == 0, res.output
    rows = {tuple(r["roles"]): r for r in json.loads(res.output)}
    for role in ("root", "targets"):
        assert rows[(role,)]["uri_configured"] and not rows[(role,)]["signs_here"]
        assert "not found" in rows[(role,)]["problem"]
    for role in ("snapshot", "timestamp", "bins"):
        assert rows[(role,)]["signs_here"], rows[(role,)]
    human = _ota("key", "list", "--project", str(proj.root_dir)).output
    assert "root (configured, not usable here)" in human
    assert "root (signs here)" not in human and "timestamp (signs here)" in human


def test_rotate_timestamp_offline_writes_unsigned_root_then_ceremony(
    proj: Project, tmp_path: Path
) -> None:
    away = _move_offline(proj, tmp_path)
    original_root = (proj.root_dir / "root.json").read_bytes()
    storage = _tree(tmp_path / "repo")
    res = _ota("key", "rotate", "timestamp", "--project", str(proj.root_dir), "--json")
    assert res.exit_code == 0, res.output
    change = json.loads(res.output)
    assert not change["root_published"] and change["unsigned_root"]
    assert _tree(tmp_path / "repo") == storage  # nothing published before the ceremony
    # the runbook: the new key is recorded, the old one keeps signing until the ceremony ends
    assert change["new_keyid"] in Project.open(proj.root_dir).config.signers
    res = _ota("root", "sign", change["unsigned_root"], "--key", f"file2:{away / 'root.pem'}")
    assert res.exit_code == 0, res.output
    res = _ota("root", "publish", change["unsigned_root"], "--project", str(proj.root_dir))
    assert res.exit_code == 0, res.output
    project = Project.open(proj.root_dir)
    assert _keyid(project, "timestamp") == change["new_keyid"]
    publish_mlp(project, "m", "1.1.0", seed=1)
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, original_root, tmp_path / "stock")
        updater.refresh()
        assert updater.get_targetinfo("releases/m/1.1.0.json") is not None


@pytest.mark.parametrize("role", ["bins", "targets"])
def test_rotation_missing_a_needed_key_writes_nothing(
    proj: Project, tmp_path: Path, role: str
) -> None:
    """bins needs the offline targets key; targets (root keys here, demo) needs its new key
    to be usable: a public-only key is refused before anything is generated or recorded."""
    args = ["key", "rotate", role, "--project", str(proj.root_dir)]
    if role == "bins":
        _move_offline(proj, tmp_path)
    else:
        _ota("key", "generate", "targets", "--out-dir", str(tmp_path / "k"), "--name", "t2")
        (tmp_path / "k" / "t2.pem").unlink()  # only the public half reaches this machine
        args += ["--new-key", str(tmp_path / "k" / "t2.pub.pem")]
    before = _tree(tmp_path / "repo", proj.root_dir)
    res = _ota(*args)
    assert res.exit_code == ExitCode.CONFIG, res.output
    assert "nothing was written" in res.output
    assert _tree(tmp_path / "repo", proj.root_dir) == before


def test_revoke_bins_with_generated_public_key_as_documented(proj: Project, tmp_path: Path) -> None:
    original_root = (proj.root_dir / "root.json").read_bytes()
    old = _keyid(proj, "bins")
    res = _ota("key", "generate", "bins", "--out-dir", str(tmp_path / "k"), "--name", "bins-2")
    assert res.exit_code == 0, res.output
    pub = str(tmp_path / "k" / "bins-2.pub.pem")
    revoke = ["key", "revoke", old[:16], "--replacement", pub, "--project", str(proj.root_dir)]
    # offline targets key away: refused up front, nothing written
    away = _move_offline(proj, tmp_path)
    before = _tree(tmp_path / "repo", proj.root_dir)
    res = _ota(*revoke)
    assert res.exit_code == ExitCode.CONFIG and "targets" in res.output, res.output
    assert _tree(tmp_path / "repo", proj.root_dir) == before
    # the key holder brings the targets key for this one transaction
    shutil.move(away, proj.root_dir / "keys" / "offline")
    res = _ota(*revoke)
    assert res.exit_code == 0, res.output
    project = Project.open(proj.root_dir)
    new = _keyid(project, "bins")
    assert new != old and old not in project.config.signers
    assert new in project.config.signers
    publish_mlp(project, "m", "1.1.0", seed=1)
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, original_root, tmp_path / "stock")
        updater.refresh()
        assert updater.get_targetinfo("releases/m/1.1.0.json") is not None


def test_revoke_bins_with_a_bare_public_key_is_refused_up_front(
    proj: Project, tmp_path: Path
) -> None:
    _ota("key", "generate", "bins", "--out-dir", str(tmp_path / "k"), "--name", "b")
    (tmp_path / "k" / "b.pem").unlink()
    before = _tree(tmp_path / "repo", proj.root_dir)
    res = _ota("key", "revoke", _keyid(proj, "bins")[:16], "--replacement",
               str(tmp_path / "k" / "b.pub.pem"), "--project", str(proj.root_dir))  # fmt: skip
    assert res.exit_code == ExitCode.CONFIG and "only its public key" in res.output, res.output
    assert _tree(tmp_path / "repo", proj.root_dir) == before


@pytest.mark.parametrize(
    ("role", "curve"),
    [("root", None), ("bins", None), ("timestamp", None), ("release", "secp256r1")],
)
def test_key_generate_algorithm_and_modes(tmp_path: Path, role: str, curve: str | None) -> None:
    res = _ota("key", "generate", role, "--out-dir", str(tmp_path), "--name", "k", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    priv, pub = Path(doc["private_key"]), Path(doc["public_key"])
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(priv.read_bytes(), None)
    public = serialization.load_pem_public_key(pub.read_bytes())
    assert doc["public_pem"] == pub.read_text()
    if curve is None:
        assert isinstance(private, ed25519.Ed25519PrivateKey) and doc["algorithm"] == "ed25519"
    else:
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == curve
    # never overwrites a key
    again = _ota("key", "generate", role, "--out-dir", str(tmp_path), "--name", "k")
    assert again.exit_code == ExitCode.INPUT and "exists already" in again.output
    assert priv.read_bytes() == private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


def test_generated_release_key_replaces_a_model_signing_key(proj: Project, tmp_path: Path) -> None:
    res = _ota("key", "generate", "release", "--out-dir", str(tmp_path / "k"), "--name", "r2",
               "--json")  # fmt: skip
    new = json.loads(res.output)
    old = next(r.keyid for r in list_keys(proj) if r.kind == "model-signing")
    res = _ota("key", "revoke", old[:16], "--replacement-signing", new["public_key"],
               "--project", str(proj.root_dir))  # fmt: skip
    assert res.exit_code == 0, res.output
    listed = {r.keyid for r in list_keys(Project.open(proj.root_dir)) if r.kind == "model-signing"}
    assert listed == {new["keyid"]}


# -- item 17: every command checks its keys before it writes ----------------------------------


def _publish_args(project: Project, tmp_path: Path, version: str) -> list[str]:
    model = tmp_path / "models" / "m-1.0.0.onnx"  # written by the fixture's publish
    return ["publish", str(model), "--project", str(project.root_dir), "--name", "m",
            "--version", version, "--ring", "canary"]  # fmt: skip


def test_publish_without_release_key_uploads_nothing(proj: Project, tmp_path: Path) -> None:
    shutil.move(proj.root_dir / "keys" / "release", tmp_path / "release-away")
    before = _tree(tmp_path / "repo", proj.root_dir)
    res = _ota(*_publish_args(proj, tmp_path, "2.0.0"))
    assert res.exit_code == ExitCode.CONFIG, res.output
    assert "release signing key" in res.output and "not found" in res.output
    assert "Traceback" not in res.output
    assert _tree(tmp_path / "repo", proj.root_dir) == before


@pytest.mark.parametrize(
    "command",
    [
        ["publish"],
        ["promote", "m", "1.0.0", "--ring", "pilot", "--percent", "10"],
        ["pause", "m", "1.0.0"],
        ["yank", "m", "1.0.0"],
        ["rollback", "m", "--to", "1.0.0"],
    ],
)
def test_commands_without_bins_key_write_nothing(
    proj: Project, tmp_path: Path, command: list[str]
) -> None:
    (proj.root_dir / "keys" / "online" / "bins.pem").unlink()
    if command == ["publish"]:
        args = _publish_args(proj, tmp_path, "2.0.0")
    else:
        args = [*command, "--project", str(proj.root_dir)]
    before = _tree(tmp_path / "repo", proj.root_dir)
    res = _ota(*args)
    assert res.exit_code == ExitCode.CONFIG, res.output
    assert "model.m" in res.output and "not found" in res.output, res.output
    assert _tree(tmp_path / "repo", proj.root_dir) == before  # no chunk, no audit entry


@pytest.mark.parametrize("command", ["pause", "yank", "unyank", "resume"])
def test_steering_an_unknown_release_writes_nothing(
    proj: Project, tmp_path: Path, command: str
) -> None:
    before = _tree(tmp_path / "repo", proj.root_dir)
    res = _ota(command, "m", "9.9.9", "--project", str(proj.root_dir), "--json")
    assert res.exit_code == ExitCode.INPUT, res.output
    assert json.loads(res.stdout)["class"] == "UnknownRelease"
    assert _tree(tmp_path / "repo", proj.root_dir) == before  # no audit-log entry


def test_failed_rotation_leaves_the_open_project_unchanged(proj: Project, tmp_path: Path) -> None:
    """The library API too: a refused rotation names no new key URI in the caller's Project
    (a later save_config would otherwise record it)."""
    from ota.repository._keyadmin import rotate
    from ota.repository._preflight import MissingKeys

    _move_offline(proj, tmp_path)
    before = dict(proj.config.signers)
    with pytest.raises(MissingKeys, match="cannot sign targets"):
        rotate(proj, "bins")
    assert proj.config.signers == before
    assert sorted(p.name for p in (proj.root_dir / "keys" / "online").iterdir()) == [
        "bins.pem", "snapshot.pem", "timestamp.pem",
    ]  # fmt: skip


def test_a_private_key_beside_the_public_one_must_match_it(proj: Project, tmp_path: Path) -> None:
    k = tmp_path / "k"
    _ota("key", "generate", "bins", "--out-dir", str(k), "--name", "good")
    _ota("key", "generate", "bins", "--out-dir", str(k), "--name", "other")
    shutil.copy(k / "other.pem", k / "good.pem")  # a swapped (or planted) private key
    before = _tree(tmp_path / "repo", proj.root_dir)
    res = _ota("key", "revoke", _keyid(proj, "bins")[:16], "--replacement",
               str(k / "good.pub.pem"), "--project", str(proj.root_dir))  # fmt: skip
    assert res.exit_code == ExitCode.INPUT and "not the private half" in res.output, res.output
    assert _tree(tmp_path / "repo", proj.root_dir) == before


def test_key_generate_never_overwrites_a_key_that_appears_after_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review (issue 12): "never overwrites" was a look-before-leap ``exists()`` check and then
    an ``os.replace``: a key file created between the two (a second `ota key generate` with
    the same name, a ceremony script) was silently replaced, losing a private key that may
    already be registered. The file must be created exclusively."""
    from ota.signing import NewKey

    check = NewKey.paths
    theirs = b"-----BEGIN PRIVATE KEY-----\nsomeone else's key\n-----END PRIVATE KEY-----\n"

    def paths_then_race(self: NewKey, path_dir: Path | str, name: str) -> tuple[Path, Path]:
        priv, pub = check(self, path_dir, name)
        priv.write_bytes(theirs)  # another process wins the race after the check
        return priv, pub

    monkeypatch.setattr(NewKey, "paths", paths_then_race)
    res = _ota("key", "generate", "timestamp", "--out-dir", str(tmp_path), "--name", "k")
    assert res.exit_code != 0, res.output
    assert (tmp_path / "k.pem").read_bytes() == theirs
    assert not (tmp_path / "k.pub.pem").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]  # no temp file left behind


def test_a_private_key_passed_as_a_path_is_never_echoed(proj: Project, tmp_path: Path) -> None:
    """Review (issue 12): a key argument that is the PEM text itself (``--new-key "$(cat
    k.pem)"``, or a mistyped ``$KEY`` instead of ``envvar:KEY``) was echoed in full in the
    error message, twice (ours and the OSError's), on stderr and in the --json error object:
    the private key landed in CI logs. Refused with exit 3, without the key material."""
    _ota("key", "generate", "timestamp", "--out-dir", str(tmp_path / "k"), "--name", "t")
    pem = (tmp_path / "k" / "t.pem").read_text()
    body = pem.splitlines()[1]
    res = _ota("key", "rotate", "timestamp", "--project", str(proj.root_dir), "--new-key", pem,
               "--json")  # fmt: skip
    assert res.exit_code == ExitCode.INPUT, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["kind"] == "input"
    assert body not in res.output and "PRIVATE KEY" not in res.output, res.output


def test_a_rotation_failing_after_root_is_published_keeps_the_new_key(
    proj: Project, tmp_path: Path
) -> None:
    """Review (issue 12): the all-or-nothing wrapper deleted the generated key and restored
    ``ota.toml`` on *any* failure, also one after root N+1 (which trusts only the new key)
    was in storage: here the local copy of root.json cannot be written (disk full, a bad
    permission). The repository then named a timestamp key whose private half had just been
    deleted: timestamp could never be signed again (devices freeze when it expires) until an
    offline root ceremony. Past the point of no return the key and its URI must stay."""
    from ota.errors import LocalError
    from ota.repository._keyadmin import refresh, rotate
    from ota.repository._txn import newest_root

    old = _keyid(proj, "timestamp")
    local_root = proj.root_dir / "root.json"
    local_root.unlink()
    local_root.mkdir()  # the local copy cannot be replaced: the last write fails
    with pytest.raises(LocalError):
        rotate(proj, "timestamp")
    published = newest_root(proj.storage).signed.roles["timestamp"].keyids
    assert published != [old]  # root N+1 is in storage: the rotation happened
    assert all(k in proj.config.signers for k in published)
    local_root.rmdir()
    again = Project.open(proj.root_dir)  # what the next command sees
    assert all(k in again.config.signers for k in published)
    assert "timestamp" in refresh(again, within_days=10_000).resigned  # still signable here


def test_key_generate_into_an_unusable_folder_is_a_local_error(tmp_path: Path) -> None:
    """Review (issue 12): `ota key generate --out-dir` under a file (or a read-only mount)
    died with a NotADirectoryError traceback and exit 1, and no JSON error under --json."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = _ota("key", "generate", "bins", "--out-dir", str(blocker / "keys"), "--name", "z",
               "--json")  # fmt: skip
    assert res.exit_code == ExitCode.LOCAL, (res.exit_code, res.exception, res.output)
    assert json.loads(res.stdout.strip().splitlines()[-1])["kind"] == "local"
