"""Offline media (issue 11, ADR 0013): ``ota offline export``, ``ota device update --from``,
``ota device report --to`` and ``ota fleet import``.

A real repository publishes ``det 1.0.0`` once per module; each test gets its own copy of the
project (online keys) and repository, exports real media from it, and installs them on a real
device (real python-tuf, real onnxruntime smoke test, real A/B slots). Online updates in the
interleaving tests go over real HTTP (``ota serve``'s app); reports go to the real fleet
service under gunicorn. Expiry is tested with ``faketime`` on the real CLI (no sleeps).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Root

from ota.bundle import Manifest
from ota.client import init_device, update_once
from ota.client._medium import MediumError, update_from_medium
from ota.errors import ExitCode, InputError
from ota.repository import Project, PublishRequest, publish
from ota.repository._offline import ExportResult, MediumRefused, export
from tests.fleet_fixtures import call, new_db, start_service
from tests.onnx_models import big_mlp, fine_tune, save
from tests.repo_helpers import make_project, serve_dir
from tests.updater_world import FAST, current_version

NOWHERE = "http://127.0.0.1:9"  # the device's repository URL: never reachable in these tests


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``proj/`` (keys, ota.toml) and ``repo/`` holding det 1.0.0; ``m2/`` a fine-tune."""
    root = tmp_path_factory.mktemp("offline")
    proj = make_project(root)
    save(big_mlp(2), root / "m1" / "model.onnx")
    publish(proj, PublishRequest(source=root / "m1" / "model.onnx", name="det", version="1.0.0"))
    save(fine_tune(big_mlp(2), 0.1), root / "m2" / "model.onnx")
    return root


class Site:
    """One test's repository (copied), its project, media folders and devices."""

    def __init__(self, published: Path, tmp: Path) -> None:
        self.tmp = tmp
        shutil.copytree(published / "proj", tmp / "proj")
        shutil.copytree(published / "repo", tmp / "repo")
        self.m2 = published / "m2" / "model.onnx"
        toml = tmp / "proj" / "ota.toml"  # this copy's own storage (for the CLI too)
        toml.write_text(toml.read_text().replace(str(published / "repo"), str(tmp / "repo")))
        self.project = Project.open(tmp / "proj")
        assert self.project.config.storage.endswith(str(tmp / "repo"))
        self.root = (tmp / "repo" / "metadata" / "1.root.json").read_bytes()

    def export(self, name: str, *wanted: str, **kw: Any) -> ExportResult:
        return export(self.project, wanted or ("det",), self.tmp / name, **kw)

    def publish_v2(self) -> None:
        publish(self.project, PublishRequest(source=self.m2, name="det", version="1.1.0"))

    def device(self, name: str = "dev", url: str = NOWHERE, **kw: Any) -> Path:
        opts: dict[str, Any] = {"ring": "canary", "health_timeout_s": 0, **kw}
        init_device(self.tmp / name, url, self.root, name, ["det"], **opts)
        return self.tmp / name

    def events(self, dev: Path, kind: str) -> list[dict[str, Any]]:
        doc = json.loads((dev / "events.json").read_bytes())
        return [e for e in doc["events"] if e["kind"] == kind]


@pytest.fixture
def site(published: Path, tmp_path: Path) -> Site:
    return Site(published, tmp_path)


def blob_files(medium: Path) -> dict[str, Path]:
    return {p.name: p for p in (medium / "blobs").rglob("*") if p.is_file()}


def ota(*args: str, faketime: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ota.cli", *args]
    if faketime:
        cmd = ["faketime", "-f", faketime, *cmd]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip


# -- install, then a delta ----------------------------------------------------------------------


def test_install_from_a_medium_then_a_delta_from_an_archive(site: Site) -> None:
    full = site.export("m1")
    assert full.releases == {"det": "1.0.0"} and full.chunks > 0 and full.chunks_omitted == 0
    dev = site.device()
    res = update_from_medium(dev, site.tmp / "m1")
    assert res.status == "updated", res.to_dict()
    assert current_version(dev) == "1.0.0"
    assert update_from_medium(dev, site.tmp / "m1").status == "up_to_date"

    site.publish_v2()
    delta = site.export("m2.tar", have=["det@1.0.0"])
    whole = site.export("m2-full")
    assert delta.archive and delta.delta_from == {"det": "1.0.0"}
    assert delta.chunks_omitted > 0 and delta.chunks + delta.chunks_omitted == whole.chunks
    assert delta.bytes < whole.bytes
    res = update_from_medium(dev, site.tmp / "m2.tar")
    assert res.status == "updated", res.to_dict()
    assert current_version(dev) == "1.1.0"
    stage = res.outcomes[0].figures["stage"]
    assert stage["bytes_reused"] + stage["bytes_linked"] > 0, stage  # the chunks left out

    # a device that lacks the base release cannot use the delta: refused, nothing installed
    other = site.device("dev-2")
    res = update_from_medium(other, site.tmp / "m2.tar")
    assert res.status == "security" and "missing" in res.outcomes[0].reason, res.to_dict()
    assert current_version(other) is None


def test_the_medium_is_read_only_and_holds_exactly_the_chosen_release(site: Site) -> None:
    site.publish_v2()
    exported = site.export("m", "det@1.0.0")
    medium = site.tmp / "m"
    # versions reserved: the repository is now past the medium, which is past what it was
    head = json.loads((site.tmp / "repo" / "metadata" / "timestamp.json").read_bytes())
    mts = json.loads((medium / "metadata" / "timestamp.json").read_bytes())["signed"]
    assert mts["version"] == exported.timestamp_version == head["signed"]["version"] - 1
    assert head["signed"]["meta"]["snapshot.json"]["version"] == exported.snapshot_version + 1
    assert mts["x-ota-medium"]["releases"] == {"det": "1.0.0"}
    before = {p: p.stat().st_mtime_ns for p in medium.rglob("*")}
    manifests = list((medium / "targets" / "releases" / "det").iterdir())
    assert len(manifests) == 1 and manifests[0].name.endswith(".1.0.0.json")
    manifest = Manifest.from_bytes(manifests[0].read_bytes())
    wanted = {c.sha256 for f in manifest.files for c in f.chunks}
    assert set(blob_files(medium)) == wanted  # exactly the blobs the release needs
    medium.chmod(0o555)
    try:
        dev = site.device()
        res = update_from_medium(dev, medium)  # the index offers 1.1.0: the medium only 1.0.0
        assert res.status == "updated" and current_version(dev) == "1.0.0", res.to_dict()
    finally:
        medium.chmod(0o755)
    assert {p: p.stat().st_mtime_ns for p in medium.rglob("*")} == before


# -- tampered, expired, old, foreign media ------------------------------------------------------


def _alter_blob(m: Path) -> None:
    p = max(blob_files(m).values(), key=lambda p: p.stat().st_size)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))


def _alter_metadata(m: Path) -> None:
    p = next(p for p in (m / "metadata").glob("*.json")  # the delegated role listing det
             if p.name.split(".")[1] not in ("root", "timestamp", "snapshot", "targets")
             and b"releases/det" in p.read_bytes())  # fmt: skip
    p.write_bytes(p.read_bytes().replace(b'"length":', b'"length": ', 1))


def _alter_expiry(m: Path) -> None:
    p = m / "metadata" / "timestamp.json"
    doc = json.loads(p.read_bytes())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    p.write_bytes(json.dumps(doc).encode())


def _alter_root(m: Path) -> None:
    """A next root naming the attacker's own keys (signed by nothing the device trusts)."""
    md = Metadata[Root].from_bytes((m / "metadata" / "1.root.json").read_bytes())
    md.signed.version += 1
    for role in md.signed.roles.values():
        role.threshold = 1
    (m / "metadata" / f"{md.signed.version}.root.json").write_bytes(md.to_bytes())


@pytest.mark.parametrize(("alter", "why"), [
    (_alter_blob, "failed verification"), (_alter_metadata, "length"),
    (_alter_expiry, "timestamp was signed by 0/1"), (_alter_root, "root was signed by 0/1"),
], ids=["blob", "metadata", "expiry", "root"])  # fmt: skip
def test_a_tampered_medium_is_refused(site: Site, alter: Any, why: str) -> None:
    site.export("m")
    alter(site.tmp / "m")
    dev = site.device()
    res = update_from_medium(dev, site.tmp / "m")
    assert res.status == "security", res.to_dict()
    assert res.exit_code == ExitCode.SECURITY
    assert why in res.outcomes[0].reason, res.to_dict()
    assert current_version(dev) is None
    assert site.events(dev, "security")
    site.export("good")  # an intact (newer) medium still works afterwards
    assert update_from_medium(dev, site.tmp / "good").status == "updated"


def test_an_expired_medium_is_refused_by_the_cli(site: Site) -> None:
    r = ota("offline", "export", "det", str(site.tmp / "m.tar"), "--expires-in", "2",
            "--project", str(site.tmp / "proj"), "--json")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["archive"] is True
    dev = site.device()
    args = ("device", "update", "--state-dir", str(dev), "--from", str(site.tmp / "m.tar"),
            "--json")  # fmt: skip
    late = ota(*args, faketime="+3d")
    assert late.returncode == ExitCode.SECURITY, late.stdout + late.stderr
    assert "expired" in json.loads(late.stdout)["models"][0]["reason"]
    assert current_version(dev) is None
    on_time = ota(*args, faketime="+1d")
    assert on_time.returncode == 0, on_time.stdout + on_time.stderr
    assert current_version(dev) == "1.0.0"


def test_an_older_medium_after_a_newer_one_is_refused(site: Site) -> None:
    site.export("old")
    site.publish_v2()
    site.export("new")
    dev = site.device()
    assert update_from_medium(dev, site.tmp / "new").status == "updated"
    res = update_from_medium(dev, site.tmp / "old")
    assert res.status == "security", res.to_dict()
    assert "older" in res.outcomes[0].reason
    assert current_version(dev) == "1.1.0"


def test_a_medium_for_another_hardware_tier_is_refused(site: Site) -> None:
    site.export("m", device_class="jetson")
    dev = site.device()
    res = update_from_medium(dev, site.tmp / "m")
    assert res.status == "security" and "jetson" in res.outcomes[0].reason, res.to_dict()
    assert current_version(dev) is None
    right = site.device("dev-j", tier="jetson")
    assert update_from_medium(right, site.tmp / "m").status == "updated"


def test_export_refuses_a_medium_outliving_the_root(site: Site) -> None:
    with pytest.raises(MediumRefused, match="root expires"):
        site.export("m", expires_in_days=400)
    assert not (site.tmp / "m").exists()
    with pytest.raises(InputError):
        site.export("m2", "det@9.9.9")
    (site.tmp / "full").mkdir()
    (site.tmp / "full" / "x").write_bytes(b"x")
    with pytest.raises(InputError, match="not an empty folder"):
        site.export("full")


# -- online and offline interleave, both orders -------------------------------------------------


@pytest.fixture
def served(site: Site) -> Iterator[str]:
    with serve_dir(site.tmp / "repo") as url:
        yield url


def test_online_then_offline_then_online(site: Site, served: str) -> None:
    dev = site.device(url=served)
    assert update_once(dev, fetch_config=FAST, report=False).status == "updated"
    site.publish_v2()
    site.export("m")  # newer than anything the device saw online
    res = update_from_medium(dev, site.tmp / "m")
    assert res.status == "updated" and current_version(dev) == "1.1.0", res.to_dict()
    res = update_once(dev, fetch_config=FAST, report=False)  # the repository is past the medium
    assert res.status == "up_to_date", res.to_dict()


def test_offline_then_online_then_the_old_medium(site: Site, served: str) -> None:
    site.export("m")
    dev = site.device(url=served)
    assert update_from_medium(dev, site.tmp / "m").status == "updated"
    assert update_once(dev, fetch_config=FAST, report=False).status == "up_to_date"
    site.publish_v2()
    assert update_once(dev, fetch_config=FAST, report=False).status == "updated"
    assert current_version(dev) == "1.1.0"
    res = update_from_medium(dev, site.tmp / "m")  # the device has seen newer, online
    assert res.status == "security" and "older" in res.outcomes[0].reason, res.to_dict()
    assert current_version(dev) == "1.1.0"


# -- reports carried back -----------------------------------------------------------------------


def test_reports_carried_back_on_a_medium_are_imported_exactly_once(site: Site) -> None:
    db = new_db("sqlite", None, site.tmp)
    with start_service(db) as svc:
        token = site.tmp / "credential"
        token.write_text(svc.enroll("dev-r", ring="canary") + "\n")
        site.export("m")
        dev = site.device("dev-r", report_url=svc.url, report_token_file=str(token))
        assert update_from_medium(dev, site.tmp / "m").status == "updated"
        queued = len(json.loads((dev / "events.json").read_bytes())["events"])
        assert queued > 0
        stick = site.tmp / "stick"
        stick.mkdir()
        r = ota("device", "report", "--state-dir", str(dev), "--to", str(stick), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout) == {"acked": 0, "written": queued, "files": 1,
                                        "pending": queued}  # fmt: skip
        assert token.read_text().strip() not in "".join(
            p.read_text() for p in stick.rglob("*") if p.is_file()
        )  # the credential never touches the medium

        def imported() -> dict[str, Any]:
            r = ota("fleet", "import", str(stick), "--db", db, "--json")
            assert r.returncode == 0, r.stdout + r.stderr
            return dict(json.loads(r.stdout))

        first = imported()
        assert first["accepted"] == 1 and first["stored"] == queued and not first["refused"]
        assert imported()["stored"] == 0  # twice: stored once
        detail = call("GET", f"{svc.url}/v1/devices/dev-r", token=svc.admin_token).doc
        seqs = [e["seq"] for e in detail["timeline"]]
        assert len(seqs) == len(set(seqs)) == queued
        assert any(r["version"] == "1.0.0" for r in detail["releases"])

        # a forged acknowledgement is not honoured (and is reported)
        ack = stick / "acks" / "dev-r.json"
        genuine = ack.read_bytes()
        doc = json.loads(genuine)
        doc["mac"] = "0" * 64
        ack.write_text(json.dumps(doc))
        r = ota("device", "report", "--state-dir", str(dev), "--to", str(stick), "--json")
        assert json.loads(r.stdout)["acked"] == 0 and json.loads(r.stdout)["pending"] > queued
        assert any("acknowledgement" in e["data"]["reason"] for e in site.events(dev, "security"))
        ack.write_bytes(genuine)

        # the acknowledgement goes back to the device on the medium: now dropped from its queue
        r = ota("device", "report", "--state-dir", str(dev), "--to", str(stick), "--json")
        assert json.loads(r.stdout)["acked"] == queued
        assert json.loads(r.stdout)["pending"] == 1  # the security event about the forged ack

        # a report forged or altered on the medium is refused (exit 4) and stores nothing
        forged = next((stick / "reports" / "dev-r").iterdir())
        doc = json.loads(forged.read_bytes())
        body = json.loads(doc["body"])
        body["events"][0]["seq"] = 10_000
        doc["body"] = json.dumps(body)
        forged.with_name("forged.json").write_text(json.dumps(doc))
        doc["mac"] = hashlib.sha256(doc["body"].encode()).hexdigest()
        forged.with_name("forged2.json").write_text(json.dumps(doc))
        r = ota("fleet", "import", str(stick), "--db", db, "--json")
        assert r.returncode == ExitCode.SECURITY, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert len(out["refused"]) == 2 and out["accepted"] == out["files"] - 2
        assert out["stored"] == 1  # only the genuine new event (the forged-ack warning)
        detail = call("GET", f"{svc.url}/v1/devices/dev-r", token=svc.admin_token).doc
        assert 10_000 not in [e["seq"] for e in detail["timeline"]]


# -- hostile media: names, symlinks, archives ----------------------------------------------------


def test_a_symlinked_blob_is_never_followed(site: Site) -> None:
    """A medium whose blob is a symlink to the right bytes elsewhere: not read (404), refused."""
    site.export("m")
    p = max(blob_files(site.tmp / "m").values(), key=lambda p: p.stat().st_size)
    outside = site.tmp / "outside"
    shutil.copy(p, outside)
    p.unlink()
    p.symlink_to(outside)
    dev = site.device()
    res = update_from_medium(dev, site.tmp / "m")
    assert res.status == "security" and "missing" in res.outcomes[0].reason, res.to_dict()
    assert current_version(dev) is None


def _retar(src: Path, dest: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for m in tin.getmembers():
            fh = tin.extractfile(m)
            tout.addfile(m, fh)
        for info, data in extra:
            tout.addfile(info, io.BytesIO(data) if data is not None else None)


def test_hostile_archives_are_refused_and_nothing_is_extracted(site: Site) -> None:
    site.export("m.tar")
    with tarfile.open(site.tmp / "m.tar") as tar:
        ts = tar.extractfile("metadata/timestamp.json")
        assert ts is not None
        data = ts.read()
    # the same name twice (which copy would be meant?): the archive is unusable
    dup = tarfile.TarInfo("metadata/timestamp.json")
    dup.size = len(data)
    _retar(site.tmp / "m.tar", site.tmp / "dup.tar", [(dup, data)])
    with pytest.raises(MediumError, match="twice"):
        update_from_medium(site.device(), site.tmp / "dup.tar")
    # escaping names and links are ignored: never written anywhere, never read
    evil = tarfile.TarInfo("../escaped")
    evil.size = 3
    link = tarfile.TarInfo("blobs/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _retar(site.tmp / "m.tar", site.tmp / "evil.tar", [(evil, b"bad"), (link, None)])
    dev = site.device("dev-2")
    assert update_from_medium(dev, site.tmp / "evil.tar").status == "updated"
    assert not (site.tmp / "escaped").exists() and not (dev.parent / "escaped").exists()
    # not a tar at all
    (site.tmp / "junk.tar").write_bytes(b"\0" * 10 + b"junk")
    with pytest.raises(InputError):
        update_from_medium(site.device("dev-3"), site.tmp / "junk.tar")


def test_a_plain_repository_copy_on_a_stick_is_a_medium_that_restricts_nothing(
    site: Site,
) -> None:
    shutil.copytree(site.tmp / "repo", site.tmp / "stick")
    dev = site.device()
    res = update_from_medium(dev, site.tmp / "stick")
    assert res.status == "updated" and current_version(dev) == "1.0.0", res.to_dict()


def test_export_refuses_when_an_online_role_would_expire_first(site: Site) -> None:
    """bins live 30 days (ota.toml [expiry]): re-signed by the export's refresh, a 40-day
    medium would still outlive them; a 20-day one does not."""
    with pytest.raises(MediumRefused, match=r"role (releases|model\.det) expires"):
        site.export("m", expires_in_days=40)
    assert not (site.tmp / "m").exists()
    site.export("m", expires_in_days=20)
    assert update_from_medium(site.device(), site.tmp / "m").status == "updated"
