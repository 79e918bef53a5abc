"""``ota fleet import DIR``: device reports carried back on offline media (ADR 0013).

Each ``reports/<device>/<file>.json`` on the medium holds the exact body a device would have
posted (``edge-ota.report/1``) and an HMAC-SHA256 of it keyed by the SHA-256 of the device's
credential, which is what this service stores (:func:`._secrets.digest`). So an import trusts
a report exactly as far as the network path does: only a holder of the device's current
credential can have written it, for that device id; a revoked device's reports are refused.
The medium itself (whoever carried it) is trusted with nothing: a forged, altered or
misfiled report is refused and counted, never stored.

Accepted reports go through the ingestion path of ``POST /v1/devices/<id>/events``
(:func:`._report.parse_report`, then :func:`._ingest.ingest`), one transaction per file, so
they are deduplicated exactly like network reports (by device, queue epoch and sequence
number): importing a medium twice, or a report that also arrived over the network, stores
each event once. The per-minute rate limit of the network path does not apply (an operator
runs the import). For each device, an acknowledgement (per queue, the seq ranges of the reports
stored, and the highest seq), authenticated the same way, is written to ``acks/<device>.json``
on the medium for ``ota device report --to`` to apply: the device forgets events only up to a
gap, so a report file deleted from the medium is never lost. Nothing on the medium is followed
or waited on: linked folders are skipped (``acks/`` linked: refused before storing anything),
report files are opened without following links or blocking, and read bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ota._atomic import write_bytes
from ota.errors import ConfigError, InputError, SecurityError, TransientError

from . import _ingest
from ._config import FleetConfig
from ._db import HEAD, current_revision, make_engine
from ._report import parse_report
from ._validate import DEVICE_ID_RE, Rejected

REPORT_FORMAT = "edge-ota.medium-report/1"
ACK_FORMAT = "edge-ota.medium-ack/1"
MAX_FILES = 100_000  # entries under reports/ (folders and files alike)
MAX_RANGES = 1024  # stored seq ranges per queue in an acknowledgement


@dataclass
class ImportResult:
    files: int = 0
    accepted: int = 0
    stored: int = 0  # new events (duplicates are not counted)
    refused: list[dict[str, str]] = field(default_factory=list)
    acks: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> queue -> ack
    # device -> queue -> [(first seq, last seq)] of each accepted report: what is stored
    ranges: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "accepted": self.accepted, "stored": self.stored,
                "refused": list(self.refused), "acks": self.acks}  # fmt: skip


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def import_reports(cfg: FleetConfig, medium: Path, *, now: float | None = None) -> ImportResult:
    """Ingest every report on ``medium`` (see the module docstring); write acknowledgements.

    Raises:
        InputError: ``medium`` is not a folder. ConfigError: the database is not migrated.
        TransientError: the database is unavailable.
    """
    root = Path(medium)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder", remedy="give the medium's folder")
    result = ImportResult()
    acks_dir = root / "acks"
    if acks_dir.is_symlink() or (acks_dir.exists() and not acks_dir.is_dir()):
        raise SecurityError(f"{acks_dir} on the medium is a link or not a folder: refused "
                            "(acknowledgements would be written wherever it points)",
                            remedy="remove it from the medium, then import again")  # fmt: skip
    files = _report_files(root)
    keys: dict[str, bytes] = {}
    engine = make_engine(cfg)
    try:
        if current_revision(engine) != HEAD:
            raise ConfigError("the fleet database is not migrated: run `ota fleet migrate`")
        for device_id, path in files:
            result.files += 1
            why = _one(engine, cfg, device_id, path, now, result, keys)
            if why:
                result.refused.append({"file": str(path.relative_to(root)), "reason": why})
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as e:
        raise TransientError(f"the fleet database is unavailable: {str(e)[:200]}") from e
    finally:
        engine.dispose()
    for device_id, queues in result.ranges.items():
        body = json.dumps({"format": ACK_FORMAT, "device": device_id, "queues": [
            {"queue": q, "ack": result.acks[device_id][q], "stored": _merged(ranges)}
            for q, ranges in sorted(queues.items())]}, sort_keys=True).encode()  # fmt: skip
        doc = {"body": body.decode(), "mac": _mac(keys[device_id], body)}
        try:
            acks_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot write acknowledgements to {acks_dir}: {e} (the reports "
                             "are stored; import again to write them)") from e  # fmt: skip
        if not stat.S_ISDIR(acks_dir.lstat().st_mode):
            raise SecurityError(f"{acks_dir} on the medium became a link: refused")
        write_bytes(acks_dir / f"{urllib.parse.quote(device_id, safe='')}.json",
                    json.dumps(doc, sort_keys=True).encode())  # fmt: skip
    return result


def _merged(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """Sorted, overlapping or adjacent ranges joined (a seq between two adjacent ranges does
    not exist), the lowest :data:`MAX_RANGES` kept (the device needs the one its oldest
    pending event falls in)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out[:MAX_RANGES]


def _report_files(root: Path) -> list[tuple[str, Path]]:
    """``(device id, file)`` for every ``reports/<device>/*.json``; symlinked folders are
    skipped; at most :data:`MAX_FILES` entries are listed (a medium with more is refused
    before anything is stored).

    Raises:
        InputError: too many entries, or the folders cannot be listed."""
    out: list[tuple[str, Path]] = []
    base = root / "reports"
    seen = 0

    def entries(folder: Path) -> list[os.DirEntry[str]]:
        nonlocal seen
        got = []
        with os.scandir(folder) as it:
            for entry in it:
                seen += 1
                if seen > MAX_FILES:
                    raise InputError(f"more than {MAX_FILES} entries under {base}",
                                     remedy="import the medium in parts")  # fmt: skip
                got.append(entry)
        return sorted(got, key=lambda e: e.name)

    try:
        if base.is_symlink() or not base.is_dir():
            return out
        for folder in entries(base):
            if not folder.is_dir(follow_symlinks=False):
                continue
            device_id = urllib.parse.unquote(folder.name)
            for path in entries(Path(folder.path)):
                if path.name.endswith(".json") and not path.name.startswith("."):
                    out.append((device_id, Path(path.path)))
    except OSError as e:
        raise InputError(f"cannot list the reports on {root}: {e}") from e
    return out


def _read_regular(path: Path, max_bytes: int) -> bytes | str:
    """The bytes of regular file ``path`` (opened without following a link and without
    blocking: a FIFO or device node is refused, not waited on), or why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return "not a regular file"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    return "too large" if len(data) > max_bytes else data


def _read(cfg: FleetConfig, device_id: str, path: Path) -> tuple[bytes, str, Any] | str:
    """(body, mac, decoded body) of one report file, or the reason it is unusable."""
    why = ""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return "not a regular file"  # not even opened: a device node may act on open
        raw = _read_regular(path, 2 * cfg.max_report_bytes + 4096)
        if isinstance(raw, str):
            return raw
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != REPORT_FORMAT:
            return "not an edge-ota medium report"
        body, tag = doc["body"], doc["mac"]
        if doc.get("device") != device_id or not isinstance(body, str) or not isinstance(tag, str):
            why = "malformed"
        elif len(body.encode()) > cfg.max_report_bytes:
            why = "too large"
        else:
            return body.encode(), tag, json.loads(body)
    except (OSError, ValueError, KeyError, RecursionError):
        why = "unreadable or not JSON"
    return why


def _one(engine: Any, cfg: FleetConfig, device_id: str, path: Path, now: float | None,
         result: ImportResult, keys: dict[str, bytes]) -> str:  # fmt: skip
    """Ingest one report file; the reason it was refused, or "" when it was accepted."""
    if not DEVICE_ID_RE.match(device_id):
        return "not a device id"
    got = _read(cfg, device_id, path)
    if isinstance(got, str):
        return got
    raw, tag, report_doc = got
    with Session(engine, expire_on_commit=False) as s, s.begin():
        dev = _ingest.lock_device(s, device_id)
        key = dev.credential_hash.encode() if dev is not None else b""
        if dev is None or not hmac.compare_digest(_mac(key, raw), tag):
            return "not authenticated by a current device credential"
        if dev.revoked_at is not None:
            return "the device is revoked"
        try:
            report = parse_report(report_doc, device_id, cfg)
        except Rejected as e:
            return f"rejected: {e.message}"
        rep = _ingest.reporter_of(s, dev)
        ack, stored = _ingest.ingest(s, rep, report, time.time() if now is None else now)
    keys[device_id] = key
    result.accepted += 1
    result.stored += stored
    queues = result.acks.setdefault(device_id, {})
    queues[report.queue] = max(queues.get(report.queue, 0), ack)
    ranges = result.ranges.setdefault(device_id, {}).setdefault(report.queue, [])
    if report.events:
        ranges.append((report.events[0].seq, report.events[-1].seq))
    return ""
