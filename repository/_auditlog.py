"""The append-only, hash-chained audit log stored with the repository (``docs/audit.md``).

Layout: one canonical-JSON object per entry at ``audit/log/<seq:012d>.json``, ``seq`` from 1,
each holding ``seq, time, actor, event, subject, details, prev_hash`` where ``prev_hash`` is the
sha256 of the previous entry's stored bytes (64 zeros for the first). Entries are created with
``Storage.put(if_none_match=True)``: two appenders never overwrite each other; the loser re-reads
and takes the next sequence number. ``audit/head.json`` is an unsigned *hint* of the newest
entry (it only saves probing; it is never trusted).

Truncation of the newest entries cannot be seen from the chain alone, so the head of the log is
*anchored* in signed TUF metadata: :func:`anchor` commits a target ``audit/head.json`` (in its
hash bin, signed with the online bins key) whose custom data holds the newest entry's ``seq``
and ``hash``. :func:`verify_log` reads that anchor through python-tuf's ``Updater`` (from the
project's trusted root) and requires the chain to reach it unchanged. Anchors only move forward.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ota.bundle import canonical_json
from ota.errors import ConflictError, SecurityError
from ota.repository._storage import NotFound, PreconditionFailed, Storage

if TYPE_CHECKING:
    from ota.repository._project import Project
    from ota.repository._txn import Transaction

LOG_PREFIX = "audit/log/"
HINT_KEY = "audit/head.json"
ANCHOR_TARGET = "audit/head.json"
ANCHOR_CUSTOM_KEY = "edge-ota-audit"
ENTRY_FORMAT = "edge-ota.auditlog/1"
GENESIS = "0" * 64
MAX_ENTRY_BYTES = 64 * 1024
MAX_ENTRIES = 1_000_000
EVENTS = frozenset(
    {
        "publish", "promote", "pause", "resume", "yank", "unyank", "rollback",
        "policy-waiver", "aborted", "key-rotate", "key-revoke", "key-add", "root-sign", "delegate",
        "refresh",
        "rollout-start", "rollout-operator", "rollout-verdict",  # issue 9 (ADR 0011)
    }
)  # fmt: skip
_NAME_RE = re.compile(r"^(\d{12})\.json\Z")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
_MAX_APPEND_ATTEMPTS = 64
T = TypeVar("T")


class LogTampered(SecurityError):
    """The audit log's chain or its signed anchor does not hold: an entry was removed,
    reordered, altered or the newest entries were truncated."""


@dataclass(frozen=True)
class LogEntry:
    seq: int
    time: str
    actor: str
    event: str
    subject: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str = ""  # sha256 of the stored bytes (not part of the stored object)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "event": self.event,
            "subject": self.subject,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def default_actor() -> str:
    """Who acts: ``$OTA_ACTOR``, else the login name, else ``unknown``."""
    actor = os.environ.get("OTA_ACTOR", "")
    if not actor:
        try:
            actor = getpass.getuser()
        except (KeyError, OSError):
            actor = "unknown"
    return actor[:128]


def entry_key(seq: int) -> str:
    return f"{LOG_PREFIX}{seq:012d}.json"


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _entry_bytes(seq: int, prev_hash: str, actor: str, event: str, subject: str,
                 details: Mapping[str, Any]) -> bytes:  # fmt: skip
    doc = {
        "format": ENTRY_FORMAT,
        "seq": seq,
        "time": _now(),
        "actor": actor,
        "event": event,
        "subject": subject,
        "details": dict(details),
        "prev_hash": prev_hash,
    }
    data = canonical_json(doc)
    if len(data) > MAX_ENTRY_BYTES:
        raise ValueError(f"audit log entry of {len(data)} bytes exceeds {MAX_ENTRY_BYTES}")
    return data


def parse_entry(data: bytes, key: str) -> LogEntry:
    """Parse and validate one stored entry.

    Raises:
        LogTampered: not a bounded, well-formed entry.
    """
    if len(data) > MAX_ENTRY_BYTES:
        raise LogTampered(f"{key}: entry larger than {MAX_ENTRY_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise LogTampered(f"{key}: not JSON ({e})") from e
    want = {"format", "seq", "time", "actor", "event", "subject", "details", "prev_hash"}
    if not isinstance(doc, dict) or set(doc) != want or doc["format"] != ENTRY_FORMAT:
        raise LogTampered(f"{key}: not an audit log entry")
    seq, prev = doc["seq"], doc["prev_hash"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise LogTampered(f"{key}: bad seq")
    if not isinstance(prev, str) or not _HEX64_RE.match(prev):
        raise LogTampered(f"{key}: bad prev_hash")
    if not all(isinstance(doc[k], str) for k in ("time", "actor", "event", "subject")):
        raise LogTampered(f"{key}: bad field types")
    if not isinstance(doc["details"], dict):
        raise LogTampered(f"{key}: details is not an object")
    return LogEntry(seq, doc["time"], doc["actor"], doc["event"], doc["subject"],
                    doc["details"], prev, hashlib.sha256(data).hexdigest())  # fmt: skip


def _get_entry(storage: Storage, seq: int) -> LogEntry | None:
    try:
        data, _ = storage.get(entry_key(seq), max_bytes=MAX_ENTRY_BYTES)
    except NotFound:
        return None
    return parse_entry(data, entry_key(seq))


def _hint(storage: Storage) -> int:
    """The newest seq the hint names (0 if none or unreadable). Never trusted, only a start."""
    try:
        doc = json.loads(storage.get(HINT_KEY, max_bytes=4096)[0])
        seq = doc["seq"]
        return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else 0
    except (NotFound, ValueError, KeyError, TypeError):
        return 0


def _tail(storage: Storage) -> LogEntry | None:
    """The newest entry: start from the hint (or a listing) and probe forward."""
    start = _hint(storage)
    if start == 0 or _get_entry(storage, start) is None:
        seqs = _listed_seqs(storage)
        start = max(seqs) if seqs else 0
    last = _get_entry(storage, start) if start else None
    while (nxt := _get_entry(storage, (last.seq if last else 0) + 1)) is not None:
        last = nxt
    return last


def append_event(
    storage: Storage,
    event: str,
    *,
    actor: str | None = None,
    subject: str = "",
    details: Mapping[str, Any] | None = None,
) -> LogEntry:
    """Append one entry after the newest; return it (its ``seq`` and ``hash``).

    Concurrent appenders never overwrite each other: the entry is created only if absent,
    and on a conflict the newest entry is re-read and the next ``seq`` taken.

    Raises:
        ValueError: an unknown event or an entry over :data:`MAX_ENTRY_BYTES`.
        ConflictError: still losing after many attempts.
        Storage errors (TransientError, LocalError) as raised by the backend.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    actor = (actor or default_actor())[:128]
    details = dict(details or {})
    last = _tail(storage)
    for _ in range(_MAX_APPEND_ATTEMPTS):
        seq = (last.seq if last else 0) + 1
        prev = last.hash if last else GENESIS
        data = _entry_bytes(seq, prev, actor, event, subject[:512], details)
        try:
            storage.put(entry_key(seq), data, if_none_match=True)
        except PreconditionFailed:
            # another appender took seq: chain onto theirs
            last = _get_entry(storage, seq) or _tail(storage)
            continue
        entry = parse_entry(data, entry_key(seq))
        storage.put(HINT_KEY, canonical_json({"seq": seq, "hash": entry.hash}))
        return entry
    raise ConflictError("could not append to the audit log: too many concurrent appenders")


def _listed_seqs(storage: Storage) -> list[int]:
    seqs: list[int] = []
    for key in storage.list(LOG_PREFIX):
        m = _NAME_RE.match(key[len(LOG_PREFIX) :])
        if m is None:
            continue
        seqs.append(int(m.group(1)))
        if len(seqs) > MAX_ENTRIES:
            raise LogTampered(f"audit log holds more than {MAX_ENTRIES} entries")
    return sorted(seqs)


def read_log(storage: Storage, *, limit: int | None = None) -> list[LogEntry]:
    """Entries in seq order (the newest ``limit`` if given). Does not verify the chain.

    Raises:
        LogTampered: an entry does not parse.
    """
    seqs = _listed_seqs(storage)
    if limit is not None:
        seqs = seqs[-limit:] if limit > 0 else []
    out = []
    for s in seqs:
        e = _get_entry(storage, s)
        if e is not None:
            out.append(e)
    return out


# -- the signed anchor --------------------------------------------------------------------


def anchor_in(project: Project, txn: Transaction, entry: LogEntry) -> None:
    """Inside a metadata transaction: make ``entry`` the signed head of the log, unless a
    newer entry (which chains through it) is anchored already. Anchors only move forward."""
    from ota.repository._project import put_target_file

    role = txn.bin_for(ANCHOR_TARGET)
    current = txn.targets(role).signed.targets.get(ANCHOR_TARGET)
    if current is not None:
        have = current.custom.get(ANCHOR_CUSTOM_KEY, {})
        seq = have.get("seq") if isinstance(have, dict) else None
        if isinstance(seq, int) and seq >= entry.seq:
            return
    doc = {ANCHOR_CUSTOM_KEY: {"seq": entry.seq, "hash": entry.hash}}
    info = put_target_file(project.storage, ANCHOR_TARGET, canonical_json(doc))
    info.unrecognized_fields["custom"] = doc
    txn.edit(role).targets[ANCHOR_TARGET] = info


def run_logged(
    project: Project,
    event: str,
    change: Callable[[Transaction], T],
    *,
    subject: str,
    details: Mapping[str, Any],
    actor: str | None = None,
    waived: Sequence[Mapping[str, str]] = (),
    runner: Callable[..., Any] | None = None,
) -> T:
    """Run a metadata change whose commit also anchors its audit log entry.

    The entry (after one ``policy-waiver`` entry per waiver) is appended *before* the commit
    and anchored *by* it: once the change is visible, removing the entry is detectable. If the
    change fails, an ``aborted`` entry naming it is appended (best effort) and the error
    re-raised; an entry left unanchored by a crash is reported by :func:`verify_log`.
    ``runner`` replaces :func:`ota.repository._txn.run` (same signature).

    Raises:
        Whatever :func:`append_event`, the change and :func:`ota.repository._txn.run` raise.
    """
    from ota.repository._txn import run

    for w in waived:
        append_event(project.storage, "policy-waiver", actor=actor, subject=subject, details=w)
    if waived:
        details = {**details, "waived": sorted(w["rule"] for w in waived)}
    entry = append_event(project.storage, event, actor=actor, subject=subject, details=details)

    def logged(txn: Transaction) -> T:
        result = change(txn)
        anchor_in(project, txn, entry)
        return result

    try:
        result: T = (runner or run)(project.storage, project.signers, project.expiry(), logged)
        return result
    except Exception as e:
        with contextlib.suppress(Exception):
            append_event(project.storage, "aborted", actor=actor, subject=subject,
                         details={"seq": entry.seq, "error": type(e).__name__})  # fmt: skip
        raise


def record(
    project: Project,
    event: str,
    *,
    subject: str,
    details: Mapping[str, Any] | None = None,
    actor: str | None = None,
) -> LogEntry:
    """Append an event that has no metadata change of its own, and anchor it in a commit of
    its own (for key ceremonies and other events outside a publish transaction).

    Raises:
        Whatever :func:`append_event` and :func:`ota.repository._txn.run` raise.
    """
    from ota.repository._txn import run

    entry = append_event(project.storage, event, actor=actor, subject=subject, details=details)
    run(project.storage, project.signers, project.expiry(),
        lambda txn: anchor_in(project, txn, entry))  # fmt: skip
    return entry


def release_details(release: Mapping[str, Any], manifest_sha256: str, ring: str,
                    percent: float) -> dict[str, Any]:  # fmt: skip
    """Audit details of a publish or rollback, from the release facts being committed."""
    return {
        "counter": release["counter"],
        "manifest_sha256": manifest_sha256,
        "ring": ring,
        "percent": repr(float(percent)),
        "rollback_of": release["rollback_of"],
    }


@dataclass
class LogVerification:
    """Result of :func:`verify_log` (which raises on failure; this is the success report)."""

    entries: int
    anchored_seq: int
    unanchored: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def verify_chain(entries: list[LogEntry]) -> list[str]:
    """Problems of a chain read in seq order (empty when intact): gaps, wrong seq, wrong link."""
    problems: list[str] = []
    prev_hash = GENESIS
    for expected, e in enumerate(entries, start=1):
        if e.seq != expected:
            problems.append(f"entry {expected} is missing or out of place (found seq {e.seq})")
            return problems
        if e.prev_hash != prev_hash:
            problems.append(
                f"entry {e.seq} does not chain to entry {e.seq - 1}: "
                f"entry {e.seq - 1} was altered, or entries were reordered or replaced"
            )
            return problems
        prev_hash = e.hash
    return problems


def verify_log(project: Project, anchor_head: tuple[int, str] | None) -> LogVerification:
    """Check the chain and that it reaches the signed anchor ``anchor_head`` (seq, hash)
    unchanged. The anchor must come from TUF-verified metadata (see ``_audit.read_anchor``).

    Raises:
        LogTampered: a removed, reordered or altered entry; a log shorter than its anchor.
    """
    entries_by_seq: dict[int, LogEntry] = {}
    for key in list(project.storage.list(LOG_PREFIX)):
        m = _NAME_RE.match(key[len(LOG_PREFIX) :])
        if m is None:
            continue
        data, _ = project.storage.get(key, max_bytes=MAX_ENTRY_BYTES)
        entry = parse_entry(data, key)
        if entry.seq != int(m.group(1)):
            raise LogTampered(f"{key} holds entry {entry.seq}: entries were moved or reordered")
        entries_by_seq[entry.seq] = entry
        if len(entries_by_seq) > MAX_ENTRIES:
            raise LogTampered(f"audit log holds more than {MAX_ENTRIES} entries")
    entries = [entries_by_seq[s] for s in sorted(entries_by_seq)]
    problems = verify_chain(entries)
    if problems:
        raise LogTampered("audit log chain broken: " + "; ".join(problems))
    anchored = 0
    if anchor_head is not None:
        anchored, want = anchor_head
        if anchored > len(entries):
            raise LogTampered(
                f"audit log truncated: the signed head is entry {anchored} "
                f"but the log ends at entry {len(entries)}"
            )
        if anchored and entries[anchored - 1].hash != want:
            raise LogTampered(f"entry {anchored} differs from the signed head of the log")
    warnings = []
    if len(entries) > anchored:
        warnings.append(
            f"{len(entries) - anchored} newest entries are not yet anchored in signed metadata "
            "(their removal would not be detected until the next anchored event)"
        )
    return LogVerification(len(entries), anchored, len(entries) - anchored, warnings)
