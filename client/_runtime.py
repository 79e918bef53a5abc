"""The import root of a runtime bundle: its unpacked folder, or its wheels unpacked beside it.

A runtime bundle is made as the publish runbook says: a folder with the runtime's wheel(s)
(``ota publish ./ort/ --kind runtime``), or with an unpacked runtime (``onnxruntime/``, as
``pip install --target`` lays it out). Python imports native extensions only from files on
disk, so a device unpacks the wheels of a verified runtime slot into ``<slot>.unpacked`` (a
sibling of the slot: the slot itself stays exactly its manifest, so ``ota verify`` and the
re-hash of a slot still hold) and imports from there.

Invariants:

* Only wheels of the slot are unpacked, and only after the slot was verified (the caller
  smoke-tests verified slots). Each file is checked against the wheel's own ``RECORD``
  (sha256 and size, PEP 376/427); a file the RECORD does not list, an absolute or ``..``
  path, a symlink, a duplicate, more than :data:`MAX_FILES` files (or members, or RECORD
  rows, in any one wheel) or :data:`MAX_BYTES` bytes is refused
  (:class:`RuntimeBundleError`), and nothing is left half-unpacked: the tree is built in a
  temporary sibling and renamed into place.
* ``<slot>.unpacked/.edge-ota-wheels`` records the sha256 of the wheels it came from; a slot
  reused for another release (other wheels) is unpacked again, never served stale.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import os
import shutil
import stat
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from ota.errors import SecurityError

MAX_FILES = 20_000
MAX_BYTES = 4 * 1024**3
STAMP = ".edge-ota-wheels"
_BLOCK = 1 << 20


class RuntimeBundleError(SecurityError):
    """A runtime bundle's wheel cannot be unpacked safely (malformed, or disagrees with its
    RECORD)."""


def has_package(folder: Path, package: str = "onnxruntime") -> bool:
    return (folder / package).is_dir()


def wheels(folder: Path) -> list[Path]:
    """The wheel files directly in ``folder`` (sorted), regular files only."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.whl") if p.is_file() and not p.is_symlink())


def import_root(runtime_dir: Path) -> Path:
    """The folder to put first on ``sys.path`` for the runtime in ``runtime_dir`` (a slot's
    ``runtime/`` folder): itself when it holds an unpacked ``onnxruntime``, else its wheels
    unpacked into ``<slot>.unpacked`` (done once per set of wheels), else itself.

    Raises:
        RuntimeBundleError: a wheel is malformed or unsafe.
        OSError: the device cannot write beside the slot.
    """
    found = wheels(runtime_dir)
    if has_package(runtime_dir) or not found:
        return runtime_dir
    slot = runtime_dir.parent if runtime_dir.name == "runtime" else runtime_dir
    dest = slot.with_name(f"{slot.name}.unpacked")
    stamp = _stamp(found)
    with contextlib.suppress(OSError):
        if (dest / STAMP).read_text() == stamp:
            return dest
    tmp = slot.with_name(f".{slot.name}.unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        budget = [MAX_FILES, MAX_BYTES]
        for w in found:
            _unpack(w, tmp, budget)
        (tmp / STAMP).write_text(stamp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_unpacked(slot: Path) -> tuple[Path, list[str]] | None:
    """Re-check ``<slot>.unpacked`` (what apps import) against the wheels of ``slot`` (its
    ``runtime/`` folder, else itself): every file must be one a wheel lists in its RECORD,
    with that sha256 and size, none missing, no symlink, and the stamp must name these
    wheels. Bytecode caches Python writes beside a wheel's sources are not checked (they are
    in no RECORD). None when the slot has no wheels or they were never unpacked.

    Returns:
        The unpacked folder and its problems (empty: it is exactly what the wheels hold).

    Raises:
        RuntimeBundleError: a wheel of the slot is malformed or unsafe.
    """
    found = next((w for w in (wheels(slot / "runtime"), wheels(slot)) if w), [])
    dest = slot.with_name(f"{slot.name}.unpacked")
    if not found or not dest.is_dir():
        return None
    expected: dict[str, tuple[str, int] | None] = {}
    for w in found:
        with zipfile.ZipFile(w) as zf:
            if len(zf.infolist()) > MAX_FILES:
                raise RuntimeBundleError(f"{w.name}: more than {MAX_FILES} members")
            dist_info, record = _record(zf, w)
            data_dir = dist_info[: -len(".dist-info")] + ".data"
            for info in zf.infolist():
                where = None if info.is_dir() else _target(info.filename, data_dir)
                if where is not None:
                    expected[where.as_posix()] = record.get(info.filename)
    problems = []
    with contextlib.suppress(OSError):
        if (dest / STAMP).read_text() != _stamp(found):
            problems.append(f"{STAMP}: unpacked from other wheels")
    seen = 0
    for path in sorted(dest.rglob("*")):
        rel = path.relative_to(dest).as_posix()
        seen += 1
        if seen > MAX_FILES + 1:
            problems.append(f"more than {MAX_FILES} files")
            break
        if path.is_symlink():
            problems.append(f"{rel}: a symlink")
        elif path.is_dir() or rel == STAMP or _compiled_cache(rel, expected):
            continue
        elif rel not in expected:
            problems.append(f"{rel}: not in any wheel")
        elif (want := expected[rel]) is not None and (
            _record_digest(path), path.stat().st_size
        ) != want:
            problems.append(f"{rel}: differs from its wheel's RECORD")
    problems += [f"{rel}: missing" for rel in sorted(expected) if not (dest / rel).is_file()]
    return dest, problems


def _compiled_cache(rel: str, expected: Mapping[str, object]) -> bool:
    """``pkg/__pycache__/mod.<tag>.pyc`` of a ``pkg/mod.py`` the wheels hold: what Python
    writes when an app imports (not checked: a bytecode cache is not in RECORD)."""
    p = PurePosixPath(rel)
    if p.suffix != ".pyc" or p.parent.name != "__pycache__":
        return False
    source = p.parent.parent / f"{p.name.split('.', 1)[0]}.py"
    return source.as_posix() in expected


def _stamp(found: list[Path]) -> str:
    return "".join(f"{_sha256(w)}  {w.name}\n" for w in found)


def _record_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _target(name: str, data_dir: str) -> PurePosixPath | None:
    """Where a wheel member goes (relative), None to skip it (``.data`` other than the
    library dirs: scripts, headers, data are not needed to import).

    Raises:
        RuntimeBundleError: an unsafe name.
    """
    p = PurePosixPath(name)
    if not name or "\\" in name or p.is_absolute() or ".." in p.parts or "" in name.split("/"):
        raise RuntimeBundleError(f"unsafe path in a runtime wheel: {name!r:.200}")
    if p.parts[0] == data_dir:
        if len(p.parts) > 2 and p.parts[1] in ("purelib", "platlib"):
            return PurePosixPath(*p.parts[2:])
        return None
    return p


def _record(zf: zipfile.ZipFile, wheel: Path) -> tuple[str, dict[str, tuple[str, int]]]:
    """The wheel's dist-info folder and its RECORD: path -> (urlsafe-b64 sha256, size)."""
    infos = [i.filename for i in zf.infolist() if i.filename.endswith(".dist-info/RECORD")]
    tops = {n.split("/")[0] for n in infos if n.count("/") == 1}
    if len(tops) != 1:
        raise RuntimeBundleError(f"{wheel.name}: not a wheel (no single *.dist-info/RECORD)")
    (dist_info,) = tops
    info = zf.getinfo(f"{dist_info}/RECORD")
    if info.file_size > 16 * 1024 * 1024:
        raise RuntimeBundleError(f"{wheel.name}: RECORD is too large")
    with zf.open(info) as f:
        text = f.read(16 * 1024 * 1024 + 1).decode("utf-8", "replace")
    record: dict[str, tuple[str, int]] = {}
    for n, row in enumerate(csv.reader(io.StringIO(text))):
        if n >= MAX_FILES:  # rows are held in memory: as bounded as the files they list
            raise RuntimeBundleError(f"{wheel.name}: RECORD lists more than {MAX_FILES} files")
        if len(row) != 3 or not row[0]:
            continue
        digest, size = row[1], row[2]
        if digest.startswith("sha256=") and size.isdigit():
            record[row[0]] = (digest[len("sha256=") :], int(size))
    return dist_info, record


def _unpack(wheel: Path, dest: Path, budget: list[int]) -> None:
    """Unpack one wheel into ``dest``, each file checked against the wheel's RECORD.

    Raises:
        RuntimeBundleError: malformed, unsafe, over budget, or a file differs from its RECORD.
    """
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise RuntimeBundleError(f"{wheel.name}: not a readable wheel: {e}") from e
    with zf:
        if len(zf.infolist()) > MAX_FILES:  # skipped members are walked too: count them all
            raise RuntimeBundleError(f"{wheel.name}: more than {MAX_FILES} members")
        dist_info, record = _record(zf, wheel)
        data_dir = dist_info[: -len(".dist-info")] + ".data"
        seen: set[str] = set()
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename
            if name in seen:
                raise RuntimeBundleError(f"{wheel.name}: {name!r:.200} appears twice")
            seen.add(name)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise RuntimeBundleError(f"{wheel.name}: symlink {name!r:.200}")
            rel = _target(name, data_dir)
            if rel is None:
                continue
            expected = record.get(name)
            is_record = name.startswith(f"{dist_info}/RECORD")  # RECORD, RECORD.jws, .p7s
            if expected is None and not is_record:
                raise RuntimeBundleError(f"{wheel.name}: {name!r:.200} is not in RECORD")
            budget[0] -= 1
            if budget[0] < 0:
                raise RuntimeBundleError(f"runtime wheels hold more than {MAX_FILES} files")
            try:
                _extract(zf, info, dest / rel, expected, budget, wheel.name)
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:
                raise RuntimeBundleError(f"{wheel.name}: {name!r:.200} clashes with another "
                                         f"member ({type(e).__name__})") from e  # fmt: skip
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise RuntimeBundleError(f"{wheel.name}: {name!r:.200} is corrupt: {e}") from e


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path,
             expected: tuple[str, int] | None, budget: list[int], wheel: str) -> None:  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    limit = expected[1] if expected is not None else 16 * 1024 * 1024
    with zf.open(info) as src, open(out, "xb") as sink:
        while block := src.read(_BLOCK):
            size += len(block)
            budget[1] -= len(block)
            if size > limit or budget[1] < 0:
                raise RuntimeBundleError(
                    f"{wheel}: {info.filename!r:.200} is larger than its RECORD says, "
                    "or the wheels exceed the budget"
                )
            h.update(block)
            sink.write(block)
    if expected is not None:
        digest = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
        if (digest, size) != expected:
            raise RuntimeBundleError(f"{wheel}: {info.filename!r:.200} differs from its RECORD")
    mode = (info.external_attr >> 16) & 0o777
    if mode & 0o111:
        out.chmod(0o755)


def current_import_path(state_dir: Path, name: str | None) -> Path:
    """What an app loads for followed bundle ``name``: the committed model file, or for a
    runtime bundle the folder to put first on ``sys.path`` (its wheels unpacked if need be).

    Raises:
        LocalError: nothing committed. RuntimeBundleError: a wheel cannot be unpacked.
    """
    from ota.client._slots import current_model

    path = current_model(state_dir, name)
    return import_root(path) if path.is_dir() else path
