"""``ota mirror sync``: a verified, resumable, never-backwards site mirror, read by real devices.

A real repository is published twice (``det 1.0.0`` then a fine-tuned ``det 1.1.0``); each
test copies those two states into its own folders, serves the source over real HTTP (``ota
serve``'s app), syncs a mirror folder and serves the mirror to the real device client.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ota.client import init_device, update_once
from ota.repository import PublishRequest, publish
from ota.repository._mirror import MirrorRefused, MirrorRollback, open_source, sync
from ota.repository._storage import FileStorage
from tests.onnx_models import big_mlp, fine_tune, save
from tests.repo_helpers import make_project, serve_dir
from tests.updater_world import FAST, current_version


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``repo_v1`` (det 1.0.0) and ``repo_v2`` (plus det 1.1.0, a fine-tune: a delta)."""
    root = tmp_path_factory.mktemp("mirror-states")
    proj = make_project(root)
    save(big_mlp(2), root / "m1" / "model.onnx")
    publish(proj, PublishRequest(source=root / "m1" / "model.onnx", name="det", version="1.0.0"))
    shutil.copytree(root / "repo", root / "repo_v1")
    save(fine_tune(big_mlp(2), 0.1), root / "m2" / "model.onnx")
    publish(proj, PublishRequest(source=root / "m2" / "model.onnx", name="det", version="1.1.0"))
    shutil.copytree(root / "repo", root / "repo_v2")
    return root


class Site:
    """A source folder served over HTTP, a mirror folder, and the mirror served to a device."""

    def __init__(self, states: Path, tmp: Path, src_url: str, mirror_url: str) -> None:
        self.states, self.tmp = states, tmp
        self.src, self.mirror, self.dev = tmp / "src", tmp / "mirror", tmp / "dev"
        self.src_url, self.mirror_url = src_url, mirror_url
        self.root = (states / "repo_v1" / "metadata" / "1.root.json").read_bytes()
        (tmp / "root.json").write_bytes(self.root)

    def use(self, state: str) -> None:
        """The source now holds repository state ``v1`` or ``v2``."""
        shutil.rmtree(self.src, ignore_errors=True)
        shutil.copytree(self.states / f"repo_{state}", self.src)

    def sync(self, **kw: Any) -> Any:
        return sync(open_source(self.src_url), FileStorage(self.mirror), self.root, **kw)

    def init_device(self) -> None:
        init_device(self.dev, self.mirror_url, self.root, "dev-1", ["det"], ring="canary",
                    health_timeout_s=0)  # fmt: skip

    def update(self) -> Any:
        return update_once(self.dev, fetch_config=FAST)


@pytest.fixture
def site(states: Path, tmp_path: Path) -> Iterator[Site]:
    (tmp_path / "src").mkdir()
    (tmp_path / "mirror").mkdir()
    with serve_dir(tmp_path / "src") as src_url, serve_dir(tmp_path / "mirror") as mirror_url:
        yield Site(states, tmp_path, src_url, mirror_url)


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (dotfiles too) with its sha256."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def blobs(folder: Path) -> set[str]:
    return {p.name for p in (folder / "blobs").rglob("*") if p.is_file()}


def assert_blobs_sound(folder: Path) -> None:
    """Every blob under its final name holds exactly the bytes its name addresses."""
    for p in (folder / "blobs").rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, p


def test_sync_then_device_updates_from_the_mirror_then_a_delta(site: Site) -> None:
    site.use("v1")
    first = site.sync()
    assert first.timestamp_version >= 1 and first.copied["blobs"] > 0
    assert first.skipped == {"blobs": 0, "targets": 0, "metadata": 0}
    assert blobs(site.mirror) == blobs(site.src)
    src = tree(site.src)
    mirrored = tree(site.mirror)
    for key in ("metadata/timestamp.json", "metadata/root.json", "metadata/1.root.json"):
        assert mirrored[key] == src[key]
    assert all(src.get(k) == h for k, h in mirrored.items()), "bytes the source never served"
    assert {k for k in src if k.startswith(("targets/", "blobs/"))} <= set(mirrored)
    assert not any(k.startswith(("audit/", "_ota/")) for k in mirrored)  # publisher-only
    site.init_device()
    res = site.update()
    assert res.status == "updated", res.to_dict()
    assert current_version(site.dev) == "1.0.0"

    # nothing new at the source: nothing copied, everything re-checked
    again = site.sync()
    assert again.copied == {"blobs": 0, "targets": 0, "metadata": 0}
    assert again.skipped["blobs"] == first.copied["blobs"]

    # a second publish: only the new chunks cross to the mirror, then a delta to the device
    site.use("v2")
    second = site.sync()
    new_chunks = blobs(site.states / "repo_v2") - blobs(site.states / "repo_v1")
    assert second.copied["blobs"] == len(new_chunks) > 0
    assert second.timestamp_version > first.timestamp_version
    res = site.update()
    assert res.status == "updated", res.to_dict()
    assert current_version(site.dev) == "1.1.0"
    stage = res.outcomes[0].figures["stage"]
    assert 0 < stage["bytes_downloaded"] < stage["bytes_total"], stage
    # a delta: unchanged chunks stayed on the device, or a binary delta from the mirror
    # rebuilt the model from the one it holds (ADR 0012)
    assert stage["bytes_reused"] > 0 or res.outcomes[0].figures["delta"]["applied"], stage
    assert site.update().status == "up_to_date"


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from ota.repository._mirror import open_source, sync
    from ota.repository._storage import FileStorage

    src, dest, root, kind, after = sys.argv[1:6]
    seen = 0

    def on_write(k: str, key: str) -> None:
        global seen
        if k == kind:
            seen += 1
            if seen >= int(after):
                os.kill(os.getpid(), signal.SIGKILL)

    sync(open_source(src), FileStorage(Path(dest)), Path(root).read_bytes(), on_write=on_write)
    print("finished without being killed")
""")


def killed_sync(site: Site, kind: str, after: int) -> None:
    """Run a sync in a child process that SIGKILLs itself after its ``after``-th ``kind``
    write (a hook, not a timer)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, site.src_url, str(site.mirror),
         str(site.tmp / "root.json"), kind, str(after)],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def test_sync_killed_half_way_then_resumed_and_served(site: Site) -> None:
    site.use("v1")
    killed_sync(site, "blobs", 2)
    # killed among the chunks: no metadata yet, so a device sees no repository at all
    assert not (site.mirror / "metadata").exists()
    assert len(blobs(site.mirror)) == 2
    assert_blobs_sound(site.mirror)
    resumed = site.sync()
    assert resumed.skipped["blobs"] == 2  # not copied again
    assert resumed.copied["blobs"] == len(blobs(site.src)) - 2
    site.init_device()
    assert site.update().status == "updated"
    assert current_version(site.dev) == "1.0.0"

    # killed among the metadata of the next state: devices still see the previous head whole
    site.use("v2")
    before = (site.mirror / "metadata" / "timestamp.json").read_bytes()
    killed_sync(site, "metadata", 1)
    assert (site.mirror / "metadata" / "timestamp.json").read_bytes() == before
    res = site.update()
    assert res.status == "up_to_date", res.to_dict()
    resumed = site.sync()
    assert resumed.copied["blobs"] == 0 and resumed.copied["metadata"] > 0
    res = site.update()
    assert res.status == "updated", res.to_dict()
    assert current_version(site.dev) == "1.1.0"
    assert_blobs_sound(site.mirror)


def _served_state(site: Site) -> dict[str, str]:
    return {k: v for k, v in tree(site.mirror).items() if not k.startswith("blobs/")}


def test_tampered_chunk_at_the_source_is_refused(site: Site) -> None:
    site.use("v1")
    site.sync()
    site.init_device()
    assert site.update().status == "updated"
    site.use("v2")
    new = sorted(blobs(site.src) - blobs(site.states / "repo_v1"))
    victim = next((site.src / "blobs").rglob(new[-1]))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = _served_state(site)
    with pytest.raises(MirrorRefused, match="content address"):
        site.sync()
    assert _served_state(site) == before  # metadata and targets untouched
    assert new[-1] not in blobs(site.mirror)
    assert_blobs_sound(site.mirror)
    assert site.update().status == "up_to_date"
    assert current_version(site.dev) == "1.0.0"


@pytest.mark.parametrize("what", ["timestamp", "snapshot", "manifest"])
def test_tampered_metadata_or_target_at_the_source_is_refused(site: Site, what: str) -> None:
    site.use("v1")
    site.sync()
    site.use("v2")
    meta = site.src / "metadata"
    if what == "manifest":
        for p in (site.src / "targets" / "releases").rglob("*.json"):  # one is new to the mirror
            p.write_bytes(p.read_bytes().replace(b'"files"', b'"files" '))
    elif what == "timestamp":
        victim = meta / "timestamp.json"
        doc = json.loads(victim.read_bytes())
        doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
        victim.write_bytes(json.dumps(doc).encode())
    else:
        victim = max(meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))
        doc = json.loads(victim.read_bytes())
        doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
        victim.write_bytes(json.dumps(doc).encode())
    before = tree(site.mirror)
    with pytest.raises(MirrorRefused):
        site.sync()
    assert tree(site.mirror) == before  # refused before anything was written


def test_older_source_after_a_newer_one_is_refused(site: Site) -> None:
    site.use("v2")
    site.sync()
    before = tree(site.mirror)
    site.use("v1")
    with pytest.raises(MirrorRollback, match=r"rollback|older than the mirror"):
        site.sync()
    assert tree(site.mirror) == before


def test_cli_json_and_exit_codes(site: Site) -> None:
    from click.testing import CliRunner

    from ota.cli._main import _register, cli

    _register()
    args = ["mirror", "sync", str(site.src), str(site.mirror),
            "--root", str(site.tmp / "root.json"), "--json"]  # fmt: skip
    site.use("v2")
    ok = CliRunner().invoke(cli, args)
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["copied"]["blobs"] == len(blobs(site.src)) and doc["timestamp_version"] >= 2
    site.use("v1")
    old = CliRunner().invoke(cli, args)
    assert old.exit_code == 4, old.output
    err = json.loads(old.stdout)
    assert err["kind"] == "security" and err["class"] == "MirrorRollback"
    gone = CliRunner().invoke(cli, ["mirror", "sync", "http://127.0.0.1:9/", str(site.mirror),
                                    "--root", str(site.tmp / "root.json"), "--timeout", "1",
                                    "--json"])  # fmt: skip
    assert gone.exit_code == 5, gone.output


def test_s3_mirror_then_s3_as_a_source(site: Site, s3_url: str) -> None:
    """An S3 bucket as the mirror, then that bucket as the source of a folder a device reads."""
    from ota.repository._storage import open_storage

    site.use("v1")
    to_s3 = sync(open_source(site.src_url), open_storage(s3_url), site.root)
    assert to_s3.copied["blobs"] == len(blobs(site.src))
    site.use("v2")
    sync(open_source(site.src_url), open_storage(s3_url), site.root)
    again = sync(open_source(site.src_url), open_storage(s3_url), site.root)
    assert again.copied == {"blobs": 0, "targets": 0, "metadata": 0}
    from_s3 = sync(open_source(s3_url), FileStorage(site.mirror), site.root)
    assert from_s3.timestamp_version == again.timestamp_version
    site.init_device()
    assert site.update().status == "updated"
    assert current_version(site.dev) == "1.1.0"
    site.use("v1")
    with pytest.raises(MirrorRollback):
        sync(open_source(site.src_url), open_storage(s3_url), site.root)


def test_a_mirror_past_a_root_rotation_refuses_a_source_before_it(site: Site) -> None:
    """The explicit version check, beyond python-tuf's: a mirror that already serves root
    version 2 never takes a source whose newest root is version 1."""
    site.use("v1")
    site.sync()
    (site.mirror / "metadata" / "2.root.json").write_bytes(site.root)
    before = tree(site.mirror)
    with pytest.raises(MirrorRollback, match="root is version 1, older than the mirror's 2"):
        site.sync()
    assert tree(site.mirror) == before
