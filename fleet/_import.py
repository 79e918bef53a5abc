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
runs the import). For each device, an acknowledgement (the highest sequence number stored per
queue), authenticated the same way, is written to ``acks/<device>.json`` on the medium for
``ota device report --to`` to apply.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ota._atomic import write_bytes
from ota.errors import ConfigError, InputError, TransientError

from . import _ingest
from ._config import FleetConfig
from ._db import HEAD, current_revision, make_engine
from ._report import parse_report
from ._validate import DEVICE_ID_RE, Rejected

REPORT_FORMAT = "edge-ota.medium-report/1"
ACK_FORMAT = "edge-ota.medium-ack/1"
MAX_FILES = 100_000


@dataclass
class ImportResult:
    files: int = 0
    accepted: int = 0
    stored: int = 0  # new events (duplicates are not counted)
    refused: list[dict[str, str]] = field(default_factory=list)
    acks: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> queue -> ack

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
    for device_id, queues in result.acks.items():
        body = json.dumps({"format": ACK_FORMAT, "device": device_id,
                           "queues": [{"queue": q, "ack": a} for q, a in sorted(queues.items())]},
                          sort_keys=True).encode()  # fmt: skip
        doc = {"body": body.decode(), "mac": _mac(keys[device_id], body)}
        (root / "acks").mkdir(exist_ok=True)
        write_bytes(root / "acks" / f"{urllib.parse.quote(device_id, safe='')}.json",
                    json.dumps(doc, sort_keys=True).encode())  # fmt: skip
    return result


def _report_files(root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    base = root / "reports"
    if not base.is_dir() or base.is_symlink():
        return out
    for folder in sorted(base.iterdir()):
        if folder.is_symlink() or not folder.is_dir():
            continue
        device_id = urllib.parse.unquote(folder.name)
        for path in sorted(folder.iterdir()):
            if len(out) >= MAX_FILES:
                raise InputError(f"more than {MAX_FILES} report files on the medium")
            if path.suffix == ".json" and not path.name.startswith("."):
                out.append((device_id, path))
    return out


def _read(cfg: FleetConfig, device_id: str, path: Path) -> tuple[bytes, str, Any] | str:
    """(body, mac, decoded body) of one report file, or the reason it is unusable."""
    why = ""
    try:
        if path.is_symlink() or not path.is_file():
            return "not a regular file"
        if path.stat().st_size > 2 * cfg.max_report_bytes + 4096:
            return "too large"
        doc = json.loads(path.read_bytes())
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
        ack, stored = _ingest.ingest(s, dev, report, time.time() if now is None else now)
    keys[device_id] = key
    result.accepted += 1
    result.stored += stored
    queues = result.acks.setdefault(device_id, {})
    queues[report.queue] = max(queues.get(report.queue, 0), ack)
    return ""
