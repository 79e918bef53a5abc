"""Attacks on offline media found in review (ADR 0013): a hostile USB stick, a careless
operator, a malicious device. Each test reproduces one attack against the real code paths
(real tar files, FIFOs and symlinks on a real file system, the real fleet service and CLI)
and failed before its fix; the docstring says which.

Also: a medium carrying two models, both updated from it.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ota.client import init_device, status, update_once
from ota.client._device import Device
from ota.client._medium import (
    DirReader,
    MediumError,
    TarReader,
    report_to_medium,
    update_from_medium,
)
from ota.errors import ExitCode, InputError
from ota.fleet import FleetConfig
from ota.fleet._import import import_reports
from ota.repository import PublishRequest, publish
from tests.fleet_fixtures import FleetService, new_db, start_service
from tests.onnx_models import big_mlp, fine_tune, save
from tests.repo_helpers import make_project, serve_dir
from tests.test_offline import NOWHERE, Site
from tests.updater_world import FAST

CLI_DEADLINE_S = 120.0  # a CLI run takes seconds; one that blocks is killed at this deadline


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As tests/test_offline.py's (``det 1.0.0``; ``m2/`` a fine-tune), plus ``cls 1.0.0``."""
    root = tmp_path_factory.mktemp("offline-attacks")
    proj = make_project(root)
    save(big_mlp(2), root / "m1" / "model.onnx")
    publish(proj, PublishRequest(source=root / "m1" / "model.onnx", name="det", version="1.0.0"))
    save(big_mlp(1, seed=7), root / "c1" / "model.onnx")
    publish(proj, PublishRequest(source=root / "c1" / "model.onnx", name="cls", version="1.0.0"))
    save(fine_tune(big_mlp(2), 0.1), root / "m2" / "model.onnx")
    return root


@pytest.fixture
def site(published: Path, tmp_path: Path) -> Site:
    return Site(published, tmp_path)


def ota(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ota.cli", *args], check=False,
                          capture_output=True, text=True, timeout=CLI_DEADLINE_S)  # fmt: skip


def reporting_device(site: Site, name: str, credential: str, url: str = "") -> Path:
    token = site.tmp / f"{name}.credential"
    token.write_text(credential + "\n")
    opts: dict[str, Any] = {"report_token_file": str(token)}
    if url:
        opts["report_url"] = url
    return site.device(name, **opts)


def queue(dev: Path, n: int) -> None:
    events = Device(dev).events
    for i in range(n):
        events.append("checked", "det", "1.0.0", n=i)


@pytest.fixture
def fleet(site: Site) -> Iterator[FleetService]:
    with start_service(new_db("sqlite", None, site.tmp)) as svc:
        yield svc


# -- a medium carrying two models ----------------------------------------------------------------


def test_a_medium_carrying_two_models_updates_both(site: Site) -> None:
    exported = site.export("m", "det", "cls")
    assert exported.releases == {"det": "1.0.0", "cls": "1.0.0"}
    dev = site.tmp / "dev2"
    init_device(dev, NOWHERE, site.root, "dev2", ["det", "cls"], ring="canary",
                health_timeout_s=0)  # fmt: skip
    res = update_from_medium(dev, site.tmp / "m")
    assert res.status == "updated", res.to_dict()
    assert {o.model: o.status for o in res.outcomes} == {"det": "updated", "cls": "updated"}
    models = status(dev).models
    assert {n: models[n]["committed_version"] for n in ("det", "cls")} == {
        "det": "1.0.0",
        "cls": "1.0.0",
    }
    assert update_from_medium(dev, site.tmp / "m").status == "up_to_date"


# -- acknowledgements never cover what the fleet did not store ---------------------------------


def test_an_ack_never_makes_the_device_forget_a_report_file_lost_on_the_way(
    site: Site, fleet: FleetService
) -> None:
    """Attack (before the fix): the carrier deletes the first report file from the stick (or
    the import refuses it); the fleet stores the later files and acknowledged their highest
    seq, and the device, honouring it, forgot the events of the deleted file, stored nowhere.
    Now the ack lists the seq ranges stored and the device forgets only up to a gap."""
    dev = reporting_device(site, "dev-r", fleet.enroll("dev-r", ring="canary"), fleet.url)
    queue(dev, 250)
    stick = site.tmp / "stick"
    stick.mkdir()
    wrote = report_to_medium(dev, stick)
    assert wrote.written == 250 and wrote.files == 3
    files = sorted((stick / "reports" / "dev-r").iterdir())
    files[0].unlink()  # the events with seq 1..100 never reach the fleet
    cfg = FleetConfig(db_url=fleet.db_url)
    first = import_reports(cfg, stick)
    assert first.accepted == 2 and first.stored == 150, first.to_dict()

    back = report_to_medium(dev, stick)  # the ack comes back: the gap is at the oldest event
    assert back.acked == 0 and back.pending == 250, back.to_dict()

    second = import_reports(cfg, stick)  # the file is on the stick again (written above)
    assert second.stored == 100, second.to_dict()
    done = report_to_medium(dev, stick)
    assert done.acked == 250 and done.pending == 0, done.to_dict()
    assert import_reports(cfg, stick).stored == 0  # each event stored exactly once


def test_reports_in_another_devices_folder_or_from_a_revoked_device_are_refused(
    site: Site, fleet: FleetService
) -> None:
    """A malicious device (its own credential) files a report as another device: its MAC is
    keyed by its own credential, so in the victim's folder (even claiming the victim's id)
    it is refused, nothing stored, no ack written; a revoked device's genuine reports are
    refused. (Confirms the threat model's claims; no fix was needed.)"""
    evil = reporting_device(site, "evil", fleet.enroll("evil", ring="canary"), fleet.url)
    reporting_device(site, "victim", fleet.enroll("victim", ring="canary"), fleet.url)
    queue(evil, 3)
    stick = site.tmp / "stick"
    stick.mkdir()
    report_to_medium(evil, stick)
    (report,) = (stick / "reports" / "evil").iterdir()
    doc = json.loads(report.read_bytes())
    (stick / "reports" / "victim").mkdir()
    (stick / "reports" / "victim" / report.name).write_bytes(report.read_bytes())
    doc["device"] = "victim"
    (stick / "reports" / "victim" / "claims-victim.json").write_text(json.dumps(doc))
    report.unlink()
    cfg = FleetConfig(db_url=fleet.db_url)
    out = import_reports(cfg, stick)
    assert out.accepted == 0 and out.stored == 0 and len(out.refused) == 2, out.to_dict()
    assert not (stick / "acks").exists()

    report_to_medium(evil, stick)
    r = ota("fleet", "device", "revoke", "evil", "--db", fleet.db_url)
    assert r.returncode == 0, r.stdout + r.stderr
    out = import_reports(cfg, stick)
    assert any(x["reason"] == "the device is revoked" for x in out.refused), out.to_dict()
    assert out.stored == 0


# -- a hostile stick against ``ota device report --to`` ----------------------------------------


def test_a_fifo_or_a_deeply_nested_ack_neither_hangs_nor_crashes_the_device(site: Site) -> None:
    """Attack (before the fix): ``acks/<device>.json`` is a FIFO: its size reads 0, and the
    device blocked for ever opening it, holding its state lock (every update cycle then
    failed with a conflict); ``[[[[…`` 50 000 deep raised RecursionError: a traceback."""
    dev = reporting_device(site, "dev-f", secrets.token_urlsafe(32))
    queue(dev, 2)
    stick = site.tmp / "stick"
    (stick / "acks").mkdir(parents=True)
    ack = stick / "acks" / "dev-f.json"
    os.mkfifo(ack)
    args = ("device", "report", "--state-dir", str(dev), "--to", str(stick), "--json")
    r = ota(*args)  # raises TimeoutExpired if the device blocks on the FIFO
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["written"] == 2
    ack.unlink()
    ack.write_bytes(b"[" * 50_000)
    r = ota(*args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert json.loads(r.stdout)["pending"] == 2


@pytest.mark.parametrize("link", ["reports", "reports/dev-s"])
def test_a_symlinked_reports_folder_on_the_stick_is_refused(site: Site, link: str) -> None:
    """Attack (before the fix): ``reports`` (or ``reports/<device>``) on the stick is a
    symlink, and the device wrote its report files wherever it pointed (any folder the
    updater can write: its own state dir, a system folder)."""
    dev = reporting_device(site, "dev-s", secrets.token_urlsafe(32))
    queue(dev, 2)
    stick, elsewhere = site.tmp / "stick", site.tmp / "elsewhere"
    elsewhere.mkdir()
    (stick / link).parent.mkdir(parents=True, exist_ok=True)
    (stick / link).symlink_to(elsewhere)
    with pytest.raises(MediumError, match="link"):
        report_to_medium(dev, stick)
    assert list(elsewhere.iterdir()) == []
    assert len(Device(dev).events.pending()) == 2


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_import_refuses_a_hostile_acks_entry_before_storing_anything(
    site: Site, fleet: FleetService, kind: str
) -> None:
    """Attack (before the fix): ``acks`` on the stick is a symlink, and ``ota fleet import``
    (run by an operator on the fleet host) wrote acknowledgement files wherever it pointed;
    a plain file there crashed the import with a traceback after the reports were stored."""
    dev = reporting_device(site, "dev-a", fleet.enroll("dev-a", ring="canary"), fleet.url)
    queue(dev, 2)
    stick, elsewhere = site.tmp / "stick", site.tmp / "elsewhere"
    elsewhere.mkdir()
    stick.mkdir()
    report_to_medium(dev, stick)
    if kind == "symlink":
        (stick / "acks").symlink_to(elsewhere)
    else:
        (stick / "acks").write_bytes(b"not a folder")
    r = ota("fleet", "import", str(stick), "--db", fleet.db_url, "--json")
    assert r.returncode == ExitCode.SECURITY and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["error"] is True
    assert list(elsewhere.iterdir()) == []
    (stick / "acks").unlink()
    out = import_reports(FleetConfig(db_url=fleet.db_url), stick)
    assert out.stored == 2 and (stick / "acks" / "dev-a.json").is_file()  # nothing was stored
    assert list(elsewhere.iterdir()) == []


# -- a hostile archive or folder against ``ota device update --from`` ----------------------------


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.USTAR_FORMAT)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME], ids=["pax", "gnu"])
def test_an_archive_header_claiming_hundreds_of_megabytes_is_not_read_into_memory(
    tmp_path: Path, kind: bytes
) -> None:
    """Attack (before the fix): a pax or GNU long-name header whose size field claims 256 MiB
    (a sparse file: nothing on disk); tarfile read all of it into memory to parse it (a 30
    GB stick: out of memory on the device). Now a member's headers are read up to 1 MiB."""
    evil = tmp_path / "evil.tar"
    claimed = 256 << 20
    with evil.open("wb") as fh:
        fh.write(_header("x", kind, claimed))
        fh.truncate(512 + claimed + 1024)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="header"):
            TarReader(evil)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak} bytes parsing a {claimed}-byte header"


def test_an_archive_of_many_members_is_indexed_in_bounded_memory(tmp_path: Path) -> None:
    """Before the fix tarfile kept every member it parsed (~1 KB each) besides the reader's
    own table: 40 000 folder entries (20 MB of archive) cost tens of MB. Now only the safe
    regular members are kept."""
    many = tmp_path / "many.tar"
    with many.open("wb") as fh:
        for i in range(40_000):
            fh.write(_header(f"d{i:06d}", tarfile.DIRTYPE, 0))
        fh.write(b"\0" * 1024)
    tracemalloc.start()
    try:
        reader = TarReader(many)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    reader.close()
    assert reader.size("d000001") is None
    assert peak < 4 << 20, f"peak {peak} bytes indexing 40 000 members"


def test_a_medium_file_swapped_for_a_fifo_after_its_check_never_blocks(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack (before the fix): the reader checked a path (``stat``: a regular file), then
    opened it by name; a FIFO swapped in between (a live hostile file system: network share,
    USB gadget) blocked the device for ever in ``open``. The swap is made deterministically
    right after the reader's check. Now the open cannot block and the opened file is the one
    checked (``fstat``)."""
    site.export("m")
    key = "metadata/timestamp.json"
    path = site.tmp / "m" / key
    reader = DirReader(site.tmp / "m")
    real = stat.S_ISREG
    swapped: list[bool] = []

    def racing(mode: int) -> bool:
        ok = real(mode)
        if not swapped:
            swapped.append(True)
            path.unlink()
            os.mkfifo(path)
        return ok

    out: list[bytes] = []
    monkeypatch.setattr(stat, "S_ISREG", racing)
    worker = threading.Thread(target=lambda: out.append(reader.pread(key, 0, 100)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    blocked = worker.is_alive()
    if blocked:  # release the reader stuck in open() so the test process can end
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=60)
    assert swapped and not blocked and out == [b""]
    assert reader.size(key) is None  # now a FIFO: not a regular file, never opened


def test_a_device_node_or_a_fifo_in_a_medium_folder_is_never_opened(site: Site) -> None:
    """A FIFO in place of a blob and a character device (``/dev/zero``'s numbers) in place of
    the timestamp: absent (404 to the updater), the update refused, nothing blocks."""
    site.export("m")
    medium = site.tmp / "m"
    blob = max((p for p in (medium / "blobs").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip
    blob.unlink()
    os.mkfifo(blob)
    reader = DirReader(medium)
    key = blob.relative_to(medium).as_posix()
    assert reader.size(key) is None and reader.pread(key, 0, 10) == b""
    dev = site.device()
    res = update_from_medium(dev, medium)
    assert res.status == "security" and "missing" in res.outcomes[0].reason, res.to_dict()
    ts = medium / "metadata" / "timestamp.json"
    ts.unlink()
    os.mknod(ts, stat.S_IFCHR | 0o644, os.makedev(1, 5))
    assert reader.size("metadata/timestamp.json") is None


def test_a_fifo_named_as_the_medium_is_a_clear_error(site: Site) -> None:
    """``--from`` naming a FIFO (anything but a folder or a regular file): exit 3, no
    traceback, no blocked open."""
    fifo = site.tmp / "m.tar"
    os.mkfifo(fifo)
    dev = site.device()
    r = ota("device", "update", "--state-dir", str(dev), "--from", str(fifo), "--json")
    assert r.returncode == ExitCode.INPUT, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cut", ["blob", "timestamp"])
def test_an_incomplete_medium_is_refused_not_retried(site: Site, cut: str) -> None:
    """Before the fix a blob cut short on the medium, or a missing timestamp, was a
    "transient" outcome (exit 5: "network unreachable, retry"), which a local medium never
    is, and no security event was recorded. Now it is refused as an altered medium (exit 4)."""
    site.export("m")
    medium = site.tmp / "m"
    if cut == "blob":
        blob = max((p for p in (medium / "blobs").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)  # fmt: skip
        os.truncate(blob, blob.stat().st_size - 1)
    else:
        (medium / "metadata" / "timestamp.json").unlink()
    dev = site.device()
    res = update_from_medium(dev, medium)
    assert res.status == "security" and res.exit_code == ExitCode.SECURITY, res.to_dict()
    assert "incomplete" in res.outcomes[0].reason, res.to_dict()
    assert site.events(dev, "security")
    assert status(dev).models["det"]["committed_version"] is None


def test_a_mediums_metadata_replayed_over_the_network_is_refused(site: Site) -> None:
    """Attack (before the fix): a man in the middle (or a careless operator serving a stick's
    folder as a "mirror") serves a medium's metadata to a device updating over the network.
    The medium's timestamp is online-signed and lives as long as the release manager chose
    (days or weeks, against the timestamp's usual hours), so this replays the repository's
    state at export time (a release yanked since still live) for the medium's whole life,
    and the medium's own restrictions (tier, carried releases), which only ``--from``
    enforces, are ignored. The repository never serves a medium's timestamp (its versions are
    reserved: the repository commits past it), so a network cycle now refuses one (exit 4)
    and installs nothing; the same medium still works as a medium."""
    site.export("m")
    with serve_dir(site.tmp / "m") as url:
        dev = site.device(url=url)
        res = update_once(dev, fetch_config=FAST, report=False)
    assert res.status == "security" and "medium" in res.outcomes[0].reason, res.to_dict()
    assert status(dev).models["det"]["committed_version"] is None
    assert site.events(dev, "security")
    assert update_from_medium(dev, site.tmp / "m").status == "updated"


def test_import_of_malformed_files_refuses_each_with_exit_4_and_no_traceback(
    site: Site,
) -> None:
    """Garbage on the stick (a careless operator or a hostile carrier): every file is listed
    as refused with a reason, nothing is stored, exit 4, never a traceback; a FIFO is not
    waited on, a symlink not followed, an oversized file not read whole."""
    db = new_db("sqlite", None, site.tmp)
    folder = site.tmp / "stick" / "reports" / "dev-x"
    folder.mkdir(parents=True)
    fmt = "edge-ota.medium-report/1"
    bad: dict[str, bytes] = {
        "binary.json": b"\xff\xfe\x00garbage",
        "list.json": b"[]",
        "deep.json": b"[" * 100_000,
        "body-not-str.json": json.dumps(
            {"format": fmt, "device": "dev-x", "body": 5, "mac": "0"}
        ).encode(),
        "surrogate.json": b'{"format": "%s", "device": "dev-x", "body": "\\ud800", "mac": ""}'
        % fmt.encode(),
        "huge.json": b" " * (8 << 20),
        "unknown-device.json": json.dumps(
            {"format": fmt, "device": "dev-x", "body": "{}", "mac": "0" * 64}
        ).encode(),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    os.mkfifo(folder / "fifo.json")
    (folder / "link.json").symlink_to("/etc/passwd")
    (site.tmp / "stick" / "reports" / "..%2F..").mkdir()
    (site.tmp / "stick" / "reports" / "..%2F.." / "x.json").write_bytes(b"{}")
    r = ota("fleet", "import", str(site.tmp / "stick"), "--db", db, "--json")
    assert r.returncode == ExitCode.SECURITY and "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert out["accepted"] == 0 and out["stored"] == 0, out
    assert len(out["refused"]) == len(bad) + 3 == out["files"], out
    reasons = {Path(x["file"]).name: x["reason"] for x in out["refused"]}
    assert reasons["fifo.json"] == reasons["link.json"] == "not a regular file", reasons
    assert reasons["huge.json"] == "too large" and reasons["x.json"] == "not a device id"
    assert not (site.tmp / "stick" / "acks").exists()
