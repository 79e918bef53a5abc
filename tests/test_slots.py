"""A/B slots: good iff manifest present, one-rename switch, current_model for apps."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ota.bundle import Chunk, FileEntry, Manifest, Release
from ota.client import _slots
from ota.client._slots import current_model
from ota.errors import LocalError


def _manifest(files: dict[str, bytes]) -> Manifest:
    entries = []
    for path, data in sorted(files.items()):
        sha = hashlib.sha256(data).hexdigest()
        entries.append(FileEntry(path, sha, len(data), (Chunk(sha, len(data)),) if data else ()))
    return Manifest("det", "1.0.0", tuple(entries))


def _stage(mdir: Path, version: str) -> Manifest:
    rel = Release("det", version, 1).to_bytes()
    files = {"release.json": rel, "model/model.onnx": version.encode()}
    stage = _slots.new_staging(mdir)
    for p, d in files.items():
        (stage / p).parent.mkdir(parents=True, exist_ok=True)
        (stage / p).write_bytes(d)
    return _manifest(files)


def test_install_switch_and_current_model(tmp_path: Path) -> None:
    mdir = _slots.model_dir(tmp_path, "det")
    with pytest.raises(LocalError):
        current_model(tmp_path)
    m = _stage(mdir, "1.0.0")
    _slots.install_staged(mdir, "a", m)
    assert _slots.read_manifest(mdir, "a") == m
    _slots.switch(mdir, "a")
    assert _slots.current_slot(mdir) == "a"
    path = current_model(tmp_path)
    assert path.read_bytes() == b"1.0.0" and not any(p.is_symlink() for p in path.parents)
    m2 = _stage(mdir, "1.1.0")
    with pytest.raises(LocalError, match="current slot"):
        _slots.install_staged(mdir, "a", m2)
    _slots.install_staged(mdir, "b", m2)
    _slots.switch(mdir, "b")
    assert current_model(tmp_path, "det").read_bytes() == b"1.1.0"
    assert _slots.read_release(mdir, "a") is not None  # previous kept for instant revert


def test_switch_refuses_bad_slot_and_is_one_rename(tmp_path: Path) -> None:
    mdir = _slots.model_dir(tmp_path, "det")
    _slots.install_staged(mdir, "a", _stage(mdir, "1.0.0"))
    _slots.mark_bad(mdir, "a")
    with pytest.raises(LocalError, match="not good"):
        _slots.switch(mdir, "a")
    _slots.install_staged(mdir, "b", _stage(mdir, "1.0.1"))
    os.symlink("slots/a", mdir / ".current.999999.tmp")  # a switch killed before its rename
    _slots.switch(mdir, "b")
    assert os.readlink(mdir / "current") == "slots/b"
    assert not list(mdir.glob(".current*"))  # no temp link left behind, nor an older one


def test_current_link_outside_slots_is_refused(tmp_path: Path) -> None:
    mdir = _slots.model_dir(tmp_path, "det")
    mdir.mkdir(parents=True)
    os.symlink("/etc", mdir / "current")
    with pytest.raises(LocalError, match="outside"):
        _slots.current_slot(mdir)


def test_model_names_cannot_escape(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="bad name"):
        _slots.model_dir(tmp_path, "../x")
