"""A/B slots of one model under the state directory, and the atomic switch (DESIGN decision 5).

Layout (per model ``name``)::

    <state>/models/<name>/slots/a/            files of one release (read-only)
    <state>/models/<name>/slots/a.manifest.json   present iff slot a holds a verified release
    <state>/models/<name>/slots/b/ ...
    <state>/models/<name>/staging/            a release being assembled (never trusted)
    <state>/models/<name>/current -> slots/a  the committed (or on-trial) slot

Invariants:

* a slot is *good* iff its ``.manifest.json`` exists; it is removed before the slot is touched
  (marked bad before writing, as RAUC does) and written, atomically, only after every file of
  the slot was verified and fsynced;
* ``current`` changes with exactly one ``rename(2)`` of a fresh symlink over it, followed by an
  fsync of the folder: a reader sees the old or the new slot, never neither;
* ``current`` only ever points at a good slot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from ota._atomic import fsync_dir, write_bytes
from ota.bundle import RELEASE_FILE, Manifest, Release, validate_name_fmt
from ota.errors import LocalError, OtaError

SLOTS = ("a", "b")
CURRENT = "current"


def model_dir(state_dir: Path, name: str) -> Path:
    """Folder of one model's slots. ``name`` is validated, so it cannot escape ``state_dir``."""
    return Path(state_dir) / "models" / validate_name_fmt(name)


def slot_path(mdir: Path, slot: str) -> Path:
    if slot not in SLOTS:
        raise LocalError(f"unknown slot {slot!r}")
    return mdir / "slots" / slot


def staging_path(mdir: Path) -> Path:
    return mdir / "staging"


def _meta_path(mdir: Path, slot: str) -> Path:
    return slot_path(mdir, slot).with_name(f"{slot}.manifest.json")


def current_slot(mdir: Path) -> str | None:
    """The slot ``current`` points at, or None when nothing is committed.

    Raises:
        LocalError: ``current`` exists but is not a link to one of the slots.
    """
    link = mdir / CURRENT
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LocalError(f"{link} is not a slot link: {e}") from e
    for s in SLOTS:
        if target == f"slots/{s}":
            return s
    raise LocalError(f"{link} points outside the slots: {target!r}")


def other(slot: str | None) -> str:
    """The inactive slot given the current one (slot ``a`` when nothing is current)."""
    return "b" if slot == "a" else "a"


def read_manifest(mdir: Path, slot: str) -> Manifest | None:
    """The manifest of a good slot, or None if the slot is not good."""
    try:
        data = _meta_path(mdir, slot).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LocalError(f"cannot read slot metadata: {e}") from e
    try:
        return Manifest.from_bytes(data)
    except OtaError:
        return None


def read_release(mdir: Path, slot: str) -> Release | None:
    """The release facts of a good slot (from its verified ``release.json``), or None."""
    if read_manifest(mdir, slot) is None:
        return None
    try:
        return Release.from_bytes((slot_path(mdir, slot) / RELEASE_FILE).read_bytes())
    except (OSError, OtaError):
        return None


def mark_bad(mdir: Path, slot: str) -> None:
    """Declare a slot not good (durably) before anything modifies it."""
    meta = _meta_path(mdir, slot)
    try:
        meta.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise LocalError(f"cannot mark slot {slot} bad: {e}") from e
    fsync_dir(meta.parent)


def new_staging(mdir: Path) -> Path:
    """A fresh, empty staging folder (any leftover from an interrupted attempt is removed by
    the caller after it has harvested its chunks)."""
    stage = staging_path(mdir)
    remove_tree(stage)
    try:
        stage.mkdir(parents=True)
    except OSError as e:
        raise LocalError(f"cannot create {stage}: {e}") from e
    return stage


def install_staged(
    mdir: Path, slot: str, manifest: Manifest, evidence: Mapping[str, bytes] | None = None
) -> None:
    """Move a fully verified, fsynced staging folder into ``slot`` and mark the slot good.

    ``evidence`` (``target.json``, ``signers.json``: what TUF verified at install) is kept
    beside the slot as ``<slot>.<name>`` so that ``ota verify`` can re-check it offline.

    Precondition: ``slot`` is not ``current``. Raises LocalError on any filesystem failure;
    the slot is then left bad (never half good).
    """
    if current_slot(mdir) == slot:
        raise LocalError(f"refusing to overwrite the current slot {slot}")
    mark_bad(mdir, slot)
    dest = slot_path(mdir, slot)
    remove_tree(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging_path(mdir), dest)
        fsync_dir(dest.parent)
    except OSError as e:
        raise LocalError(f"cannot install slot {slot}: {e}") from e
    for name, data in (evidence or {}).items():
        write_bytes(dest.with_name(f"{slot}.{name}"), data)
    write_bytes(_meta_path(mdir, slot), manifest.to_bytes())  # last: marks the slot good


def switch(mdir: Path, slot: str) -> None:
    """Point ``current`` at ``slot`` with one atomic rename, then fsync the folder.

    Raises:
        LocalError: the slot is not good, or the filesystem refused.
    """
    if read_manifest(mdir, slot) is None:
        raise LocalError(f"refusing to switch to slot {slot}: it is not good")
    tmp = mdir / f".{CURRENT}.{os.getpid()}.tmp"
    for stale in mdir.glob(f".{CURRENT}.*.tmp"):  # left by a killed switch (one updater runs)
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    try:
        os.symlink(f"slots/{slot}", tmp)
        os.replace(tmp, mdir / CURRENT)
        fsync_dir(mdir)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise LocalError(f"cannot switch {mdir.name} to slot {slot}: {e}") from e


def clear_current(mdir: Path) -> None:
    """Remove ``current`` (revert of a first install: nothing was committed before)."""
    try:
        (mdir / CURRENT).unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise LocalError(f"cannot clear {mdir / CURRENT}: {e}") from e
    fsync_dir(mdir)


def remove_tree(path: Path) -> None:
    """Remove a folder (read-only files included); missing is fine."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise LocalError(f"cannot remove {path}: {e}") from e


def current_model(state_dir: Path | str, name: str | None = None) -> Path:
    """Path of the committed model file that apps should load (resolved, not via ``current``).

    With ``name`` None, the state directory must hold exactly one model with a current slot.
    During a health window this is the release on trial: the app confirms it or it is reverted.

    Raises:
        LocalError: no committed model (or several and no ``name``), or unreadable state.
    """
    root = Path(state_dir) / "models"
    if name is None:
        names = sorted(p.name for p in root.glob("*") if (p / CURRENT).is_symlink())
        if len(names) != 1:
            raise LocalError(f"{len(names)} models are committed in {state_dir}; name one")
        name = names[0]
    mdir = model_dir(Path(state_dir), name)
    slot = current_slot(mdir)
    release = read_release(mdir, slot) if slot else None
    if slot is None or release is None:
        raise LocalError(f"no committed model {name!r} in {state_dir}")
    return slot_path(mdir, slot).resolve() / release.model_path
