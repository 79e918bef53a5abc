"""The device side of the service: enrolment, credential rotation, report ingestion.

Each function runs inside the caller's transaction and raises
:class:`~ota.fleet._validate.Rejected` before writing anything it would have to undo: the
caller commits only when the function returns, so a refused or failed request writes nothing.

Invariants:

* a device row is locked (``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` locks the file) by
  the statement that checks its credential (report path: one Core lookup by device id and
  credential digest, :func:`authenticate_report`; enrolment and rotation: the ORM row,
  :func:`authenticate`), so a report, a rotation, a revocation and a prune of one device are
  serialised and a rotated-out credential cannot slip one more report in;
* an event is a duplicate iff a row with its ``(device, queue epoch, seq)`` exists or its seq
  is at most the highest seq pruned from that queue (``queues.pruned_seq``: pruning does not
  make old events new); the unique constraint backs that up. Only events above the highest
  seq stored before (``queues.high_seq``) move derived state, so a late or replayed event
  never turns a device's state back;
* the ack is the highest seq of the report: every event up to it is stored when the
  transaction commits (new ones now, the others earlier);
* components add their own per-report work with :func:`on_new_events` (a hook per event
  kind, called in the report's transaction with the events it stored), never by editing
  the ingestion path.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, insert, select, text, update
from sqlalchemy.orm import Session

from . import _secrets
from ._config import FleetConfig
from ._models import AuditRecord, Device, DeviceModel, EnrollToken, Event, Queue, ReleaseState
from ._report import KIND_RE, Facts, Report, ReportEvent
from ._validate import Rejected

# Kinds that move a release's state on a device, and the device's health they imply.
STATE_KINDS = frozenset(
    {
        "checked",
        "downloaded",
        "staged",
        "smoke_passed",
        "smoke_failed",
        "committed",
        "confirmed",
        "reverted",
        "security",
        "refused",
        "failed",
    }
)
OUTCOMES = {
    "confirmed": "ok",
    "reverted": "failing",
    "smoke_failed": "failing",
    "failed": "failing",
    "refused": "failing",
    "security": "security",
}
# A credential the device proposes on rotation (ota.client._enroll.CREDENTIAL_RE's alphabet),
# no longer than a bearer the service reads (_secrets.MAX_SECRET_CHARS): a longer one would be
# taken, the old one killed, and the device locked out by its next report.
PROPOSED_RE = re.compile(r"^[A-Za-z0-9_\-.~+/]{43,128}={0,2}\Z")


def unauthorized(message: str = "not a valid credential for this device") -> Rejected:
    return Rejected(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def lock_device(s: Session, device_id: str) -> Device | None:
    return s.scalars(
        select(Device).where(Device.device_id == device_id).with_for_update()
    ).one_or_none()


def authenticate(s: Session, device_id: str, secret: str) -> Device:
    """The locked, enrolled, unrevoked device whose current credential is ``secret``."""
    if not secret or len(secret) > 520:
        raise unauthorized()
    dev = lock_device(s, device_id)
    if dev is None or not _secrets.matches(secret, dev.credential_hash):
        raise unauthorized()
    if dev.revoked_at is not None:
        raise unauthorized("this device is revoked")
    return dev


@dataclass(frozen=True)
class Enrolled:
    """An enrolment's answer; ``replayed`` when it repeats one committed earlier (200, no
    token use spent), else it is new (201)."""

    device_id: str
    credential: str
    ring: str
    tier: str
    replayed: bool = False


def enroll(
    s: Session,
    token: str,
    device_id: str,
    facts: Facts,
    now: float,
    proposal: str | None = None,
) -> Enrolled:
    """Spend one use of ``token`` on ``device_id``. A revoked device may enrol again (its
    history is kept, its old credential stays dead); an enrolled one may not (409).

    ``proposal`` (a fresh secret the device generated and stored before asking) becomes the
    credential, so an enrolment whose reply was lost can be retried: the retry with the same
    device id, the same proposal (its digest is the device's current credential hash) and
    the same token (by row: the device's ``enrolled_by``; not revoked, but its expiry and use
    count are not checked again, that use was counted when it committed) answers the same
    credential again, writes nothing and spends no use. Anything else for an enrolled device
    is 409 (also when that token has since expired or been used up). A proposal that is
    already the credential of another device id, or the dead credential of this revoked
    one, is refused (409 ``credential_taken``): a secret identifies one enrolment. Without
    a proposal the service makes the credential (the older request shape)."""
    if not _secrets.well_formed(token, _secrets.ENROLL_PREFIX):
        raise unauthorized("not a valid enrolment token")
    if proposal is not None and not PROPOSED_RE.match(proposal):
        raise Rejected(
            400, "malformed", "the proposed credential is not 43-512 characters of base64url"
        )
    tok = s.scalars(
        select(EnrollToken)
        .where(EnrollToken.token_hash == _secrets.digest(token))
        .with_for_update()
    ).one_or_none()
    if tok is None or tok.revoked_at is not None:
        raise unauthorized("not a valid enrolment token")
    dev = lock_device(s, device_id)
    if dev is not None and dev.revoked_at is None and dev.enrolled_by == tok.name:
        if proposal is not None and _secrets.matches(proposal, dev.credential_hash):
            return Enrolled(device_id, proposal, dev.ring, dev.tier, replayed=True)
        raise Rejected(409, "already_enrolled", "this device id is already enrolled")
    if tok.expires_at <= now:
        raise unauthorized("this enrolment token has expired")
    if tok.uses >= tok.max_uses:
        raise unauthorized("this enrolment token is used up")
    if dev is not None and dev.revoked_at is None:
        raise Rejected(409, "already_enrolled", "this device id is already enrolled")
    if proposal is not None:
        digest = _secrets.digest(proposal)
        taken = s.scalar(
            select(Device.id)
            .where(Device.credential_hash == digest, Device.device_id != device_id)
            .limit(1)
        )
        if taken is not None or (dev is not None and dev.credential_hash == digest):
            raise Rejected(
                409, "credential_taken", "the proposed credential is not fresh; propose another"
            )
    ring = tok.ring or facts.ring
    tier = tok.tier or facts.tier
    credential = proposal or _secrets.new_secret(_secrets.DEVICE_PREFIX)
    if dev is None:
        dev = Device(
            device_id=device_id,
            enrolled_at=now,
            health="unknown",
            events_total=0,
            dropped_total=0,
            rate_window_start=0.0,
            rate_count=0,
        )
        s.add(dev)
    if dev.id is not None:  # re-enrolment of a revoked device: its rows count again
        s.execute(
            update(DeviceModel)
            .where(DeviceModel.device_pk == dev.id)
            .values(ring=ring, tier=tier, active=True)
        )
        s.execute(update(ReleaseState).where(ReleaseState.device_pk == dev.id).values(active=True))
    dev.credential_hash = _secrets.digest(credential)
    dev.ring, dev.tier, dev.revoked_at = ring, tier, None
    dev.enrolled_at, dev.enrolled_by = now, tok.name
    dev.claimed_ring, dev.claimed_tier = facts.ring, facts.tier
    dev.arch, dev.runtime_version = facts.arch, facts.runtime_version
    dev.client_version = facts.client_version
    note = _claims_note(dev.ring, dev.tier, dev.arch, facts, at_enrolment=True)
    dev.claims_changed, dev.claims_note = bool(note), note
    tok.uses += 1
    s.add(
        AuditRecord(
            at=now,
            actor=f"enroll:{tok.name}",
            action="device.enroll",
            target=device_id,
            detail={"ring": ring, "tier": tier},
        )
    )
    return Enrolled(device_id, credential, ring, tier)


def rotate(s: Session, dev: Device, proposed: str | None, now: float) -> str:
    """Replace the credential of the (authenticated, locked) ``dev``; the old one is dead
    when this commits. ``proposed`` (the device's own fresh secret) is taken if well
    formed, so a device that lost the reply can retry with it."""
    if proposed is None:
        new = _secrets.new_secret(_secrets.DEVICE_PREFIX)
    elif len(proposed) <= _secrets.MAX_SECRET_CHARS and PROPOSED_RE.match(proposed):
        new = proposed
    else:
        raise Rejected(
            400, "malformed", "the proposed credential is not 43-128 characters of base64url"
        )
    dev.credential_hash = _secrets.digest(new)
    s.add(
        AuditRecord(
            at=now,
            actor=f"device:{dev.device_id}"[:160],
            action="device.rotate_credential",
            target=dev.device_id,
        )
    )
    return new


@dataclass
class Reporter:
    """The locked row of a device sending a report: the columns ingestion reads, loaded by
    one Core ``SELECT … FOR UPDATE`` (no ORM object) and written back by one ``UPDATE``."""

    pk: int
    device_id: str
    ring: str
    tier: str
    arch: str
    models_digest: str
    events_total: int
    dropped_total: int
    rate_window_start: float
    rate_count: int


_DEVICE = cast(Table, Device.__table__)
_QUEUE = cast(Table, Queue.__table__)
_EVENT = cast(Table, Event.__table__)
_RELEASE = cast(Table, ReleaseState.__table__)
_MODEL = cast(Table, DeviceModel.__table__)
_D = _DEVICE.c
# One indexed lookup by the device id *and* the digest of the bearer: a wrong credential
# matches no row and locks nothing. On PostgreSQL ``FOR UPDATE`` re-checks the WHERE clause
# on the newest version of a row it waited for, so a report racing a rotation that commits
# first finds no row (401): a rotated-out credential cannot slip one more report in.
_AUTH = (
    select(
        _D.id,
        _D.revoked_at,
        _D.ring,
        _D.tier,
        _D.arch,
        _D.models_digest,
        _D.events_total,
        _D.dropped_total,
        _D.rate_window_start,
        _D.rate_count,
    )
    .where(_D.device_id == bindparam("device_id"), _D.credential_hash == bindparam("digest"))
    .with_for_update()
)
_REPORTER = (
    select(*_AUTH.selected_columns).where(_D.id == bindparam("pk")).with_for_update()
)
# Read after the device row is locked (its own statement, so on PostgreSQL it sees what a
# report of the same device that held the lock before committed; a join in the locking
# statement would return the queue row as of before the wait).
_QUEUE_ROW = select(_QUEUE.c.high_seq, _QUEUE.c.pruned_seq, _QUEUE.c.dropped).where(
    _QUEUE.c.device_pk == bindparam("pk"), _QUEUE.c.epoch == bindparam("epoch")
)


_QUEUE_NEW = insert(_QUEUE).values(
    device_pk=bindparam("q_pk"),
    epoch=bindparam("q_epoch"),
    high_seq=bindparam("q_high"),
    pruned_seq=0,
    dropped=bindparam("q_dropped"),
    first_seen=bindparam("q_t"),
)
_QUEUE_MOVE = (
    update(_QUEUE)
    .where(_QUEUE.c.device_pk == bindparam("q_pk"), _QUEUE.c.epoch == bindparam("q_epoch"))
    .values(high_seq=bindparam("q_high"), dropped=bindparam("q_dropped"))
)


def authenticate_report(s: Session, device_id: str, secret: str) -> Reporter:
    """The locked, enrolled, unrevoked device whose current credential is ``secret``.

    The digest is compared by the database's index (no constant-time compare in Python): a
    lookup's timing depends on the SHA-256 of the guess, which tells an attacker nothing
    about a 256-bit secret."""
    if not secret or len(secret) > 520:
        raise unauthorized()
    row = (
        s.connection()
        .execute(_AUTH, {"device_id": device_id, "digest": _secrets.digest(secret)})
        .one_or_none()
    )
    if row is None:
        raise unauthorized()
    if row.revoked_at is not None:
        raise unauthorized("this device is revoked")
    return _reporter(row, device_id)


def reporter_of(s: Session, dev: Device) -> Reporter:
    """The :class:`Reporter` view of ``dev``, a device row the caller has already locked and
    authenticated by other means (``ota fleet import`` checks a medium report's HMAC against
    the credential digest; tests drive ingestion directly)."""
    row = s.connection().execute(_REPORTER, {"pk": dev.id}).one()
    return _reporter(row, dev.device_id)


def _reporter(row: Any, device_id: str) -> Reporter:
    return Reporter(
        pk=int(row.id),
        device_id=device_id,
        ring=row.ring or "",
        tier=row.tier or "",
        arch=row.arch or "",
        models_digest=row.models_digest or "",
        events_total=int(row.events_total or 0),
        dropped_total=int(row.dropped_total or 0),
        rate_window_start=float(row.rate_window_start or 0.0),
        rate_count=int(row.rate_count or 0),
    )


def check_rate(dev: Reporter, cfg: FleetConfig, now: float) -> None:
    """Count this report in the device's window, or refuse it with 429 (nothing counted)."""
    if now - dev.rate_window_start >= cfg.rate_window_s or now < dev.rate_window_start:
        dev.rate_window_start, dev.rate_count = now, 0
    if dev.rate_count >= cfg.rate_max_reports:
        wait = max(1, math.ceil(dev.rate_window_start + cfg.rate_window_s - now))
        raise Rejected(
            429, "rate_limited", "this device reports too often", {"Retry-After": str(wait)}
        )
    dev.rate_count += 1


# --- hooks: work that other components add to a report's transaction ------------------------

EventHook = Callable[[Session, Reporter, Sequence[ReportEvent]], None]
_HOOKS: dict[str, list[EventHook]] = {}


def on_new_events(kind: str, hook: EventHook) -> None:
    """Call ``hook(session, device, events)`` for every report that stores new events of
    ``kind``: ``events`` are those of this report stored now (each event reaches the hooks
    exactly once in its life, on the report that stored it; a late one too, so check ``seq``
    if order matters), in seq order. It runs inside the report's transaction after its events
    are inserted: what it writes commits with the report, and a :class:`Rejected` (or any
    error) it raises refuses the whole report (nothing stored, nothing acked). It must not
    commit, and should cost little (every report pays it)."""
    if not KIND_RE.match(kind):
        raise ValueError(f"not an event kind: {kind!r}")
    _HOOKS.setdefault(kind, []).append(hook)


def _run_hooks(s: Session, dev: Reporter, stored: list[ReportEvent]) -> None:
    by_kind: dict[str, list[ReportEvent]] = {}
    for e in stored:
        if e.kind in _HOOKS:
            by_kind.setdefault(e.kind, []).append(e)
    for kind, events in by_kind.items():
        for hook in _HOOKS[kind]:
            hook(s, dev, events)


# --- ingestion -------------------------------------------------------------------------------


def ingest(s: Session, dev: Reporter, report: Report, now: float) -> tuple[int, int]:
    """Store ``report`` of the locked ``dev``; return ``(ack, new events stored)``.

    Few round trips and little Python per report (its cost is mostly per-statement CPU), all
    SQLAlchemy Core, no ORM object: the queue row, one multi-row ``INSERT … ON CONFLICT DO
    NOTHING RETURNING seq`` of the events (the unique key deduplicates, the returned seqs say
    which were new), one upsert of all the releases touched, the queue row when it moved,
    the device's models only when their digest changed, and one ``UPDATE`` of the device."""
    conn = s.connection()
    q = conn.execute(_QUEUE_ROW, {"pk": dev.pk, "epoch": report.queue}).one_or_none()
    high, pruned, dropped = (int(q[0] or 0), int(q[1] or 0), int(q[2] or 0)) if q else (0, 0, 0)
    # Above the high-water mark nothing is stored yet (the common case). Below it, an event is
    # stored unless it already is, or was pruned: a late event from a device that sent out of
    # order is kept, never acked without being stored.
    candidates = [e for e in report.events if e.seq > pruned]
    stored: list[ReportEvent] = []
    if candidates:
        seqs = _insert_events(s, dev.pk, report.queue, now, candidates)
        stored = [e for e in candidates if e.seq in seqs]
    n_new = len(stored)
    fresh = [e for e in stored if e.seq > high]  # late events never move state backwards
    values: dict[str, Any] = {}
    if n_new:
        values["events_total"] = _saturating(dev.events_total, n_new)
    add_dropped = report.dropped if report.dropped and (n_new or not report.events) else 0
    if add_dropped:  # saturating: an overflow would refuse every later report of the device
        values["dropped_total"] = _saturating(dev.dropped_total, add_dropped)
    new_high = max(high, fresh[-1].seq) if fresh else high
    if q is None:
        conn.execute(
            _QUEUE_NEW,
            {
                "q_pk": dev.pk,
                "q_epoch": report.queue,
                "q_high": new_high,
                "q_dropped": add_dropped,
                "q_t": now,
            },
        )
    elif new_high != high or add_dropped:
        conn.execute(
            _QUEUE_MOVE,
            {
                "q_pk": dev.pk,
                "q_epoch": report.queue,
                "q_high": new_high,
                "q_dropped": _saturating(dropped, add_dropped),
            },
        )
    _derive(s, dev, report, fresh, now, values)
    if stored and _HOOKS:
        _run_hooks(s, dev, stored)
    values["rate_window_start"], values["rate_count"] = dev.rate_window_start, dev.rate_count
    conn.execute(
        _update_device(tuple(values)), {f"b_{k}": v for k, v in values.items()} | {"pk_": dev.pk}
    )
    return (report.events[-1].seq if report.events else 0), n_new


MAX_COUNTER = 2**63 - 1  # a BIGINT column, and SQLite's INTEGER


def _saturating(total: int | None, add: int) -> int:
    """``total + add``, capped at what the column holds: a drop count only ever informs, and
    an overflow would refuse every later report of the device (its events never acked)."""
    return min((total or 0) + add, MAX_COUNTER)


def _derive(
    s: Session,
    dev: Reporter,
    report: Report,
    new: list[ReportEvent],
    now: float,
    values: dict[str, Any],
) -> None:
    """Put the device's new facts, health and last outcome in ``values`` (its row's update),
    and write its models (when they changed) and its releases' states."""
    f = report.facts
    note = _claims_note(dev.ring, dev.tier, dev.arch, f, at_enrolment=False)
    if note:
        values["claims_changed"], values["claims_note"] = True, note
    values.update(
        claimed_ring=f.ring,
        claimed_tier=f.tier,
        arch=f.arch,
        runtime_version=f.runtime_version,
        client_version=f.client_version,
        last_seen=now,
    )
    if report.events:
        values["last_device_time"] = report.events[-1].time
    digest = _models_digest(report.models)
    if digest != dev.models_digest:
        _sync_models(s, dev, report.models, now)
        values["models_digest"] = digest
    touched: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for e in new:
        values["last_kind"] = e.kind
        if e.kind in STATE_KINDS and e.model:
            touched[(e.model, e.version)] = (e.kind, e.data)
        if e.kind in OUTCOMES:
            values["last_outcome"], values["health"] = e.kind, OUTCOMES[e.kind]
            values["last_outcome_model"], values["last_outcome_version"] = e.model, e.version
            values["last_outcome_at"] = now
    if touched:
        s.connection().execute(
            _upsert_releases(s),
            [
                {
                    "device_pk": dev.pk,
                    "model": model,
                    "version": version,
                    "state": state,
                    "detail": data,
                    "updated_at": now,
                    "active": True,
                }
                for (model, version), (state, data) in touched.items()
            ],
        )


def _dialect_insert(s: Session, table: Any) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    pg = s.get_bind().dialect.name == "postgresql"
    return (postgresql.insert if pg else sqlite.insert)(table)


_STATEMENTS: dict[tuple[str, str], Any] = {}


def _insert_events(
    s: Session, pk: int, epoch: str, now: float, events: list[ReportEvent]
) -> set[int]:
    """Insert ``events`` of one queue unless stored already (``ON CONFLICT (device_pk, epoch,
    seq) DO NOTHING``); the seqs it stored (``RETURNING seq``). One statement, one round
    trip, whose SQL is the same for every report of n events, so it is compiled once and
    prepared by the database:

    * PostgreSQL: ``INSERT … SELECT … FROM json_to_recordset(:rows)``, the events as one
      JSON text: four parameters whatever n (psycopg caches the conversion of a query only up
      to 50 parameters, and a multi-row ``VALUES`` has 6 per event; one array per column
      costs more to adapt than one string);
    * SQLite: a multi-row ``VALUES`` written once per n (its driver caches statements by
      text).

    Text statements, because SQLAlchemy compiles a multi-row ``insert().values([...])``
    again at every execution (≈ 1 ms for 10 rows). ``data`` is JSON text, as the column's
    type writes it."""
    dialect = s.get_bind().dialect.name
    conn = s.connection()
    if dialect == "postgresql":
        rows = [
            {
                "seq": e.seq,
                "kind": e.kind,
                "model": e.model,
                "version": e.version,
                "time": e.time,
                "data": e.data,
            }
            for e in events
        ]
        params: dict[str, Any] = {"pk": pk, "epoch": epoch, "now": now, "rows": json.dumps(rows)}
        return set(conn.execute(_PG_EVENTS, params).scalars())
    n = len(events)
    params = {"pk": pk, "epoch": epoch, "now": now}
    for i, e in enumerate(events):
        params[f"seq_{i}"], params[f"kind_{i}"] = e.seq, e.kind
        params[f"model_{i}"], params[f"version_{i}"] = e.model, e.version
        params[f"dtime_{i}"], params[f"data_{i}"] = e.time, json.dumps(e.data)
    stmt = _STATEMENTS.get(("events", str(n)))
    if stmt is None:
        values = ", ".join(
            f"(:pk, :epoch, :seq_{i}, :kind_{i}, :model_{i}, :version_{i}, :dtime_{i}, :now, "
            f":data_{i})"
            for i in range(n)
        )
        sql = (  # placeholders only, never a value
            "INSERT INTO events (device_pk, epoch, seq, kind, model, version, device_time, "  # noqa: S608
            f"received_at, data) VALUES {values} "
            "ON CONFLICT (device_pk, epoch, seq) DO NOTHING RETURNING seq"
        )
        stmt = _STATEMENTS["events", str(n)] = text(sql)
    return set(conn.execute(stmt, params).scalars())


_PG_EVENTS = text(
    "INSERT INTO events (device_pk, epoch, seq, kind, model, version, device_time, "
    "received_at, data) "
    "SELECT CAST(:pk AS BIGINT), CAST(:epoch AS VARCHAR), e.seq, e.kind, e.model, e.version, "
    "e.time, CAST(:now AS FLOAT8), e.data "
    "FROM json_to_recordset(CAST(:rows AS JSON)) "
    "AS e(seq BIGINT, kind VARCHAR, model VARCHAR, version VARCHAR, time FLOAT8, data JSON) "
    "ON CONFLICT (device_pk, epoch, seq) DO NOTHING RETURNING seq"
)


def _update_device(keys: tuple[str, ...]) -> Any:
    """``UPDATE devices SET <keys> WHERE id = :pk_``, built once per set of columns."""
    stmt = _STATEMENTS.get(("device", ",".join(keys)))
    if stmt is None:
        stmt = _STATEMENTS["device", ",".join(keys)] = (
            update(_DEVICE)
            .where(_D.id == bindparam("pk_"))
            .values({k: bindparam(f"b_{k}", type_=_D[k].type) for k in keys})
        )
    return stmt


def _upsert_releases(s: Session) -> Any:
    """Insert or update ``release_states`` rows in one statement (both dialects have
    ``INSERT … ON CONFLICT DO UPDATE``), built once per dialect (no per-report statement
    construction); the rows of one report have distinct keys (one per release touched)."""
    key = ("releases", s.get_bind().dialect.name)
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        ins = _dialect_insert(s, _RELEASE)
        stmt = _STATEMENTS[key] = ins.on_conflict_do_update(
            index_elements=["device_pk", "model", "version"],
            set_={
                "state": ins.excluded.state,
                "active": ins.excluded.active,
                "detail": ins.excluded.detail,
                "updated_at": ins.excluded.updated_at,
            },
        )
    return stmt


def _models_digest(models: dict[str, tuple[str, int]]) -> str:
    text = json.dumps(sorted(models.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _sync_models(s: Session, dev: Reporter, models: dict[str, tuple[str, int]], now: float) -> None:
    """Make the device's ``device_models`` rows what it reported (Core statements)."""
    conn = s.connection()
    m = _MODEL.c
    have = {
        r.model: (r.version, r.counter)
        for r in conn.execute(select(m.model, m.version, m.counter).where(m.device_pk == dev.pk))
    }
    new = [
        {
            "device_pk": dev.pk,
            "model": name,
            "version": version,
            "counter": counter,
            "updated_at": now,
            "ring": dev.ring,
            "tier": dev.tier,
            "active": True,
        }
        for name, (version, counter) in models.items()
        if name not in have
    ]
    if new:
        conn.execute(insert(_MODEL), new)
    changed = [
        {"pk": dev.pk, "name": name, "v": version, "c": counter, "t": now}
        for name, (version, counter) in models.items()
        if name in have and have[name] != (version, counter)
    ]
    if changed:
        conn.execute(
            update(_MODEL)
            .where(m.device_pk == bindparam("pk"), m.model == bindparam("name"))
            .values(version=bindparam("v"), counter=bindparam("c"), updated_at=bindparam("t")),
            changed,
        )
    gone = [n for n in have if n not in models]
    if gone:
        conn.execute(delete(_MODEL).where(m.device_pk == dev.pk, m.model.in_(gone)))


def _claims_note(ring: str, tier: str, arch: str, f: Facts, *, at_enrolment: bool) -> str:
    """Why a device's claims disagree with what enrolment fixed (``ring``, ``tier``) or its
    hardware changed (``arch``), or "": flagged, never refused (reports are diagnostics, but
    an operator must see the disagreement)."""
    notes = []
    if ring and f.ring and f.ring != ring:
        notes.append(f"claims ring {f.ring!r}, enrolled as {ring!r}")
    if tier and f.tier and f.tier != tier:
        notes.append(f"claims tier {f.tier!r}, enrolled as {tier!r}")
    if not at_enrolment and arch and f.arch and f.arch != arch:
        notes.append(f"arch changed from {arch!r} to {f.arch!r}")
    return "; ".join(notes)[:512]
