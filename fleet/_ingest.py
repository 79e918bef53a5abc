"""The device side of the service: enrolment, credential rotation, report ingestion.

Each function runs inside the caller's transaction and raises
:class:`~ota.fleet._validate.Rejected` before writing anything it would have to undo: the
caller commits only when the function returns, so a refused or failed request writes nothing.

Invariants:

* a device row is locked (``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` locks the file) before
  its credential is checked, so a report, a rotation and a revocation of one device are
  serialised and a rotated-out credential cannot slip one more report in;
* an event is a duplicate iff a row with its ``(device, queue epoch, seq)`` exists or its seq
  is at most the highest seq pruned from that queue (``queues.pruned_seq``: pruning does not
  make old events new); the unique constraint backs that up. Only events above the highest
  seq stored before (``queues.high_seq``) move derived state, so a late or replayed event
  never turns a device's state back;
* the ack is the highest seq of the report: every event up to it is stored when the
  transaction commits (new ones now, the others earlier).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.orm import Session

from . import _secrets, _telemetry
from ._config import FleetConfig
from ._models import AuditRecord, Device, DeviceModel, EnrollToken, Event, Queue, ReleaseState
from ._report import Facts, Report
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
    dev.claims_changed, dev.claims_note = False, ""
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
    _flag_claims(dev, facts, now, at_enrolment=True)
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


def check_rate(dev: Device, cfg: FleetConfig, now: float) -> None:
    """Count this report in the device's window, or refuse it with 429 (nothing counted)."""
    if now - dev.rate_window_start >= cfg.rate_window_s or now < dev.rate_window_start:
        dev.rate_window_start, dev.rate_count = now, 0
    if dev.rate_count >= cfg.rate_max_reports:
        wait = max(1, math.ceil(dev.rate_window_start + cfg.rate_window_s - now))
        raise Rejected(
            429, "rate_limited", "this device reports too often", {"Retry-After": str(wait)}
        )
    dev.rate_count += 1


def ingest(s: Session, dev: Device, report: Report, now: float) -> tuple[int, int]:
    """Store ``report`` of the locked ``dev``; return ``(ack, new events stored)``.

    Few round trips and little Python per report (its cost is mostly per-statement CPU):
    the queue row (SQLAlchemy Core, no ORM object), one multi-row insert of the new events,
    one upsert of all the releases touched, the device's models only when their digest
    changed, and the update of the device row at commit."""
    with s.no_autoflush:
        return _ingest(s, dev, report, now)


_QUEUE = cast(Table, Queue.__table__)
_EVENT = cast(Table, Event.__table__)
_RELEASE = cast(Table, ReleaseState.__table__)


def _ingest(s: Session, dev: Device, report: Report, now: float) -> tuple[int, int]:
    conn = s.connection()
    where = (_QUEUE.c.device_pk == dev.id) & (_QUEUE.c.epoch == report.queue)
    # the device row lock serialises its queues
    q = conn.execute(
        select(_QUEUE.c.high_seq, _QUEUE.c.pruned_seq, _QUEUE.c.dropped).where(where)
    ).one_or_none()
    high, pruned, dropped = (int(q[0] or 0), int(q[1] or 0), int(q[2] or 0)) if q else (0, 0, 0)
    # Above the high-water mark nothing can be stored yet (the common case: a plain insert).
    # Below it, an event is stored unless it already is, or was pruned: a late event from a
    # device that sent out of order is kept, never acked without being stored.
    fresh = [e for e in report.events if e.seq > high]
    late = [e for e in report.events if pruned < e.seq <= high]
    rows = [
        {
            "device_pk": dev.id,
            "epoch": report.queue,
            "seq": e.seq,
            "kind": e.kind,
            "model": e.model,
            "version": e.version,
            "device_time": e.time,
            "received_at": now,
            "data": e.data,
        }
        for e in late + fresh
    ]
    if late:  # one round trip: the insert skips the stored ones and says which it stored
        stored = set(
            conn.execute(
                _dialect_insert(s, _EVENT)
                .on_conflict_do_nothing(index_elements=["device_pk", "epoch", "seq"])
                .returning(_EVENT.c.seq),
                rows,
            ).scalars()
        )
        n_new = len(stored)
    elif rows:
        conn.execute(insert(_EVENT), rows)
        n_new = len(rows)
    else:
        n_new = 0
    if n_new:
        dev.events_total = (dev.events_total or 0) + n_new
    add_dropped = report.dropped if report.dropped and (n_new or not report.events) else 0
    if add_dropped:  # saturating: an overflow would refuse every later report of the device
        dev.dropped_total = _saturating(dev.dropped_total, add_dropped)
    new_high = fresh[-1].seq if fresh else high
    if q is None:
        conn.execute(
            insert(_QUEUE).values(
                device_pk=dev.id,
                epoch=report.queue,
                high_seq=new_high,
                pruned_seq=0,
                dropped=add_dropped,
                first_seen=now,
            )
        )
    elif new_high != high or add_dropped:
        conn.execute(
            update(_QUEUE)
            .where(where)
            .values(high_seq=new_high, dropped=_saturating(dropped, add_dropped))
        )
    _derive(s, dev, report, fresh, now)  # late events never move state backwards
    _telemetry.absorb(s, dev, report.models, fresh, now)  # issue 9: fold telemetry summaries
    return (report.events[-1].seq if report.events else 0), n_new


MAX_COUNTER = 2**63 - 1  # a BIGINT column, and SQLite's INTEGER


def _saturating(total: int | None, add: int) -> int:
    """``total + add``, capped at what the column holds: a drop count only ever informs, and
    an overflow would refuse every later report of the device (its events never acked)."""
    return min((total or 0) + add, MAX_COUNTER)


def _derive(s: Session, dev: Device, report: Report, new: list[Any], now: float) -> None:
    """Update the device's facts, models, health and its releases' states."""
    f = report.facts
    _flag_claims(dev, f, now, at_enrolment=False)
    dev.claimed_ring, dev.claimed_tier = f.ring, f.tier
    dev.arch, dev.runtime_version, dev.client_version = f.arch, f.runtime_version, f.client_version
    dev.last_seen = now
    if report.events:
        dev.last_device_time = report.events[-1].time
    digest = _models_digest(report.models)
    if digest != dev.models_digest:
        _sync_models(s, dev, report.models, now)
        dev.models_digest = digest
    touched: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for e in new:
        dev.last_kind = e.kind
        if e.kind in STATE_KINDS and e.model:
            touched[(e.model, e.version)] = (e.kind, e.data)
        if e.kind in OUTCOMES:
            dev.last_outcome, dev.health = e.kind, OUTCOMES[e.kind]
            dev.last_outcome_model, dev.last_outcome_version = e.model, e.version
            dev.last_outcome_at = now
    if touched:
        s.connection().execute(
            _upsert_releases(s),
            [
                {
                    "device_pk": dev.id,
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


_UPSERTS: dict[str, Any] = {}


def _upsert_releases(s: Session) -> Any:
    """Insert or update ``release_states`` rows in one statement (both dialects have
    ``INSERT … ON CONFLICT DO UPDATE``), built once per dialect (no per-report statement
    construction); the rows of one report have distinct keys (one per release touched)."""
    name = s.get_bind().dialect.name
    stmt = _UPSERTS.get(name)
    if stmt is None:
        ins = _dialect_insert(s, _RELEASE)
        stmt = _UPSERTS[name] = ins.on_conflict_do_update(
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


def _sync_models(s: Session, dev: Device, models: dict[str, tuple[str, int]], now: float) -> None:
    have = {
        m.model: m for m in s.scalars(select(DeviceModel).where(DeviceModel.device_pk == dev.id))
    }
    for name, (version, counter) in models.items():
        row = have.get(name)
        if row is None:
            s.add(
                DeviceModel(
                    device_pk=dev.id,
                    model=name,
                    version=version,
                    counter=counter,
                    updated_at=now,
                    ring=dev.ring,
                    tier=dev.tier,
                    active=True,
                )
            )
        elif row.version != version or row.counter != counter:
            row.version, row.counter, row.updated_at = version, counter, now
    gone = [n for n in have if n not in models]
    if gone:
        s.execute(
            delete(DeviceModel).where(DeviceModel.device_pk == dev.id, DeviceModel.model.in_(gone))
        )


def _flag_claims(dev: Device, f: Facts, now: float, *, at_enrolment: bool) -> None:
    """Flag (never refuse) a device whose claims disagree with what enrolment fixed or whose
    hardware changed: reports are diagnostics, but an operator must see the disagreement."""
    notes = []
    if dev.ring and f.ring and f.ring != dev.ring:
        notes.append(f"claims ring {f.ring!r}, enrolled as {dev.ring!r}")
    if dev.tier and f.tier and f.tier != dev.tier:
        notes.append(f"claims tier {f.tier!r}, enrolled as {dev.tier!r}")
    if not at_enrolment and dev.arch and f.arch and f.arch != dev.arch:
        notes.append(f"arch changed from {dev.arch!r} to {f.arch!r}")
    if notes:
        dev.claims_changed = True
        dev.claims_note = "; ".join(notes)[:512]
