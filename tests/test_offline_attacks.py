"""Attacks on offline media found in review (ADR 0013): a hostile USB stick, a careless
operator, a malicious device. Each test reproduces one attack against the real code paths
(real tar files, FIFOs and symlinks on a real file system, the real fleet service and CLI)
and failed before its fix; the docstring says which.

Also: a medium carrying two models, both updated from it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from pathlib import Path

import pytest

from ota.client import init_device, status
from ota.client._medium import (
    DirReader,
    TarReader,
    update_from_medium,
)
from ota.errors import ExitCode, InputError
from ota.repository import PublishRequest, publish
from tests.onnx_models import big_mlp, fine_tune, save
from tests.repo_helpers import make_project
from tests.test_offline import NOWHERE, Site

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
