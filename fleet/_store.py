"""Operator-side operations on the fleet database, shared by the HTTP API and the CLI.

Each function works in the caller's transaction. Functions that change state write an
:class:`~ota.fleet._models.AuditRecord` naming ``actor`` (the operator token's name, or
``local:<user>`` for the CLI working on the database directly) in that same transaction.
Queries aggregate the derived tables with indexed ``GROUP BY``s, never the event log.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, case, delete, exists, func, select, update
from sqlalchemy.orm import Session

from . import _secrets
from ._models import (
    AuditRecord,
    Device,
    DeviceModel,
    EnrollToken,
    Event,
    OperatorToken,
    Queue,
    ReleaseState,
)
from ._validate import Rejected

MAX_TOKEN_LIFETIME_S = 366 * 86400
HEALTH = ("unknown", "ok", "failing", "security")


def _conflict(message: str) -> Rejected:
    return Rejected(409, "conflict", message)


def _not_found(message: str) -> Rejected:
    return Rejected(404, "not_found", message)


def _audit(
    s: Session,
    actor: str,
    action: str,
    target: str,
    now: float,
    detail: dict[str, Any] | None = None,
) -> None:
    s.add(AuditRecord(at=now, actor=actor[:160], action=action, target=target[:128], detail=detail))


# --- operator tokens -------------------------------------------------------------------------


def authenticate_operator(s: Session, secret: str, need: str, now: float) -> OperatorToken:
    """The operator token ``secret`` if valid, unexpired, unrevoked and allowing ``need``:
    401 otherwise, 403 when valid but under-scoped."""
    if not _secrets.well_formed(secret, _secrets.OPERATOR_PREFIX):
        raise Rejected(
            401, "unauthorized", "an operator token is required", {"WWW-Authenticate": "Bearer"}
        )
    tok = s.scalars(
        select(OperatorToken).where(OperatorToken.token_hash == _secrets.digest(secret))
    ).one_or_none()
    if (
        tok is None
        or tok.revoked_at is not None
        or (tok.expires_at is not None and tok.expires_at <= now)
    ):
        raise Rejected(
            401,
            "unauthorized",
            "this operator token is not valid (unknown, expired or revoked)",
            {"WWW-Authenticate": "Bearer"},
        )
    if not _secrets.scope_allows(tok.scope, need):
        raise Rejected(403, "forbidden", f"this call needs the {need!r} scope")
    return tok


def create_operator_token(
    s: Session, name: str, scope: str, lifetime_s: float | None, actor: str, now: float
) -> tuple[str, dict[str, Any]]:
    if scope not in _secrets.SCOPES:
        raise Rejected(400, "malformed", f"scope must be one of {', '.join(_secrets.SCOPES)}")
    if s.scalars(select(OperatorToken.id).where(OperatorToken.name == name)).first():
        raise _conflict(f"a token named {name!r} exists")
    secret = _secrets.new_secret(_secrets.OPERATOR_PREFIX)
    tok = OperatorToken(
        name=name,
        scope=scope,
        token_hash=_secrets.digest(secret),
        created_at=now,
        created_by=actor[:64],
        expires_at=None if lifetime_s is None else now + lifetime_s,
    )
    s.add(tok)
    _audit(s, actor, "token.create", name, now, {"scope": scope})
    return secret, operator_token_dict(tok, now)


def operator_token_dict(t: OperatorToken, now: float) -> dict[str, Any]:
    return {
        "name": t.name,
        "scope": t.scope,
        "created_at": t.created_at,
        "created_by": t.created_by,
        "expires_at": t.expires_at,
        "revoked_at": t.revoked_at,
        "active": t.revoked_at is None and (t.expires_at is None or t.expires_at > now),
    }


def list_operator_tokens(s: Session, now: float) -> list[dict[str, Any]]:
    return [
        operator_token_dict(t, now)
        for t in s.scalars(select(OperatorToken).order_by(OperatorToken.name))
    ]


def revoke_operator_token(s: Session, name: str, actor: str, now: float) -> dict[str, Any]:
    tok = s.scalars(
        select(OperatorToken).where(OperatorToken.name == name).with_for_update()
    ).one_or_none()
    if tok is None:
        raise _not_found(f"no token named {name!r}")
    if tok.revoked_at is None:
        tok.revoked_at = now
        _audit(s, actor, "token.revoke", name, now)
    return operator_token_dict(tok, now)


# --- enrolment tokens ------------------------------------------------------------------------


def create_enroll_token(
    s: Session,
    name: str,
    uses: int,
    lifetime_s: float,
    ring: str,
    tier: str,
    actor: str,
    now: float,
) -> tuple[str, dict[str, Any]]:
    if s.scalars(select(EnrollToken.id).where(EnrollToken.name == name)).first():
        raise _conflict(f"an enrolment token named {name!r} exists")
    secret = _secrets.new_secret(_secrets.ENROLL_PREFIX)
    tok = EnrollToken(
        name=name,
        token_hash=_secrets.digest(secret),
        ring=ring,
        tier=tier,
        max_uses=uses,
        uses=0,
        created_at=now,
        created_by=actor[:64],
        expires_at=now + lifetime_s,
    )
    s.add(tok)
    _audit(s, actor, "enroll_token.create", name, now, {"uses": uses, "ring": ring, "tier": tier})
    return secret, enroll_token_dict(tok, now)


def enroll_token_dict(t: EnrollToken, now: float) -> dict[str, Any]:
    return {
        "name": t.name,
        "ring": t.ring,
        "tier": t.tier,
        "max_uses": t.max_uses,
        "uses": t.uses,
        "created_at": t.created_at,
        "created_by": t.created_by,
        "expires_at": t.expires_at,
        "revoked_at": t.revoked_at,
        "active": t.revoked_at is None and t.expires_at > now and t.uses < t.max_uses,
    }


def list_enroll_tokens(s: Session, now: float) -> list[dict[str, Any]]:
    return [
        enroll_token_dict(t, now) for t in s.scalars(select(EnrollToken).order_by(EnrollToken.name))
    ]


def revoke_enroll_token(s: Session, name: str, actor: str, now: float) -> dict[str, Any]:
    tok = s.scalars(
        select(EnrollToken).where(EnrollToken.name == name).with_for_update()
    ).one_or_none()
    if tok is None:
        raise _not_found(f"no enrolment token named {name!r}")
    if tok.revoked_at is None:
        tok.revoked_at = now
        _audit(s, actor, "enroll_token.revoke", name, now)
    return enroll_token_dict(tok, now)


# --- devices ---------------------------------------------------------------------------------


def revoke_device(s: Session, device_id: str, actor: str, now: float) -> dict[str, Any]:
    dev = s.scalars(
        select(Device).where(Device.device_id == device_id).with_for_update()
    ).one_or_none()
    if dev is None:
        raise _not_found(f"no device {device_id!r}")
    if dev.revoked_at is None:
        dev.revoked_at = now
        # the derived rows stop counting in the fleet's figures with the device
        s.execute(update(DeviceModel).where(DeviceModel.device_pk == dev.id).values(active=False))
        s.execute(update(ReleaseState).where(ReleaseState.device_pk == dev.id).values(active=False))
        _audit(s, actor, "device.revoke", device_id, now)
    return device_dict(dev, _models_of(s, [dev.id]).get(dev.id, {}))


def device_dict(d: Device, models: dict[str, Any]) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "ring": d.ring,
        "tier": d.tier,
        "claimed": {"ring": d.claimed_ring, "tier": d.claimed_tier},
        "claims_changed": bool(d.claims_changed),
        "claims_note": d.claims_note,
        "arch": d.arch,
        "runtime_version": d.runtime_version,
        "client_version": d.client_version,
        "enrolled_at": d.enrolled_at,
        "revoked": d.revoked_at is not None,
        "revoked_at": d.revoked_at,
        "last_seen": d.last_seen,
        "last_device_time": d.last_device_time,
        "last_kind": d.last_kind or "",
        "health": d.health,
        "last_outcome": {
            "kind": d.last_outcome or "",
            "model": d.last_outcome_model or "",
            "version": d.last_outcome_version or "",
            "at": d.last_outcome_at,
        },
        "events_total": d.events_total or 0,
        "dropped_total": d.dropped_total or 0,
        "models": models,
    }


def _models_of(s: Session, pks: list[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {pk: {} for pk in pks}
    if pks:
        for m in s.scalars(select(DeviceModel).where(DeviceModel.device_pk.in_(pks))):
            out[m.device_pk][m.model] = {"version": m.version, "counter": m.counter}
    return out


def list_devices(
    s: Session,
    *,
    model: str = "",
    version: str = "",
    ring: str = "",
    tier: str = "",
    health: str = "",
    seen_after: float | None = None,
    seen_before: float | None = None,
    revoked: bool | None = None,
    limit: int = 100,
    after: str = "",
) -> dict[str, Any]:
    """One page of devices ordered by id, ``after`` the given id (keyset pagination: the
    cost of a page does not grow with its position)."""
    q = select(Device).order_by(Device.device_id).limit(limit + 1)
    if model or version:
        cond = [DeviceModel.device_pk == Device.id]
        if model:
            cond.append(DeviceModel.model == model)
        if version:
            cond.append(DeviceModel.version == version)
        q = q.where(exists().where(*cond))
    if ring:
        q = q.where(Device.ring == ring)
    if tier:
        q = q.where(Device.tier == tier)
    if health:
        q = q.where(Device.health == health)
    if seen_after is not None:
        q = q.where(Device.last_seen >= seen_after)
    if seen_before is not None:
        q = q.where((Device.last_seen < seen_before) | Device.last_seen.is_(None))
    if revoked is not None:
        q = q.where(Device.revoked_at.is_not(None) if revoked else Device.revoked_at.is_(None))
    if after:
        q = q.where(Device.device_id > after)
    rows = list(s.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    models = _models_of(s, [d.id for d in rows])
    return {
        "devices": [device_dict(d, models[d.id]) for d in rows],
        "next": rows[-1].device_id if more and rows else None,
    }


def device_detail(s: Session, device_id: str, n_events: int) -> dict[str, Any]:
    dev = s.scalars(select(Device).where(Device.device_id == device_id)).one_or_none()
    if dev is None:
        raise _not_found(f"no device {device_id!r}")
    out = device_dict(dev, _models_of(s, [dev.id])[dev.id])
    out["releases"] = [
        {
            "model": r.model,
            "version": r.version,
            "state": r.state,
            "detail": r.detail,
            "updated_at": r.updated_at,
        }
        for r in s.scalars(
            select(ReleaseState)
            .where(ReleaseState.device_pk == dev.id)
            .order_by(ReleaseState.updated_at.desc())
            .limit(200)
        )
    ]
    out["timeline"] = [
        {
            "seq": e.seq,
            "queue": e.epoch,
            "kind": e.kind,
            "model": e.model,
            "version": e.version,
            "device_time": e.device_time,
            "received_at": e.received_at,
            "data": e.data,
        }
        for e in s.scalars(
            select(Event).where(Event.device_pk == dev.id).order_by(Event.id.desc()).limit(n_events)
        )
    ]
    return out


# --- fleet state -----------------------------------------------------------------------------


def summary(s: Session, now: float, silent_after_s: float) -> dict[str, Any]:
    """One scan of ``devices`` (grouped by health), and one of each derived table without a
    join (their ``active`` copy of the device's state; index-only where the database can)."""
    active = Device.revoked_at.is_(None)
    health = dict.fromkeys(HEALTH, 0)
    total = revoked = flagged = silent = events = 0
    for h, n, r, f, si, ev in s.execute(
        select(
            Device.health,
            func.count(),
            func.count(Device.revoked_at),
            func.count().filter(Device.claims_changed.is_(True)),
            func.count().filter(
                active, (Device.last_seen < now - silent_after_s) | Device.last_seen.is_(None)
            ),
            func.coalesce(func.sum(Device.events_total), 0),
        ).group_by(Device.health)
    ):
        total, revoked, flagged = total + n, revoked + r, flagged + f
        silent, events = silent + si, events + int(ev)
        health[h] = health.get(h, 0) + n - r
    releases: dict[tuple[str, str], dict[str, int]] = {}
    for m, v, st, n in s.execute(
        select(ReleaseState.model, ReleaseState.version, ReleaseState.state, func.count())
        .where(ReleaseState.active.is_(True))
        .group_by(ReleaseState.model, ReleaseState.version, ReleaseState.state)
    ):
        releases.setdefault((m, v), {})[st] = n
    models = [
        {"model": m, "version": v, "ring": r, "tier": t, "devices": n}
        for m, v, r, t, n in s.execute(
            select(
                DeviceModel.model,
                DeviceModel.version,
                DeviceModel.ring,
                DeviceModel.tier,
                func.count(),
            )
            .where(DeviceModel.active.is_(True))
            .group_by(DeviceModel.model, DeviceModel.version, DeviceModel.ring, DeviceModel.tier)
            .order_by(DeviceModel.model, DeviceModel.version, DeviceModel.ring, DeviceModel.tier)
        )
    ]
    return {
        "generated_at": now,
        "devices": {
            "total": total,
            "active": total - revoked,
            "revoked": revoked,
            "silent": silent,
            "flagged": int(flagged),
            "by_health": health,
        },
        "events_received": int(events),
        "releases": [
            {"model": m, "version": v, "states": st, "confirmed": st.get("confirmed", 0)}
            for (m, v), st in sorted(releases.items())
        ],
        "models": models,
    }


def release_detail(s: Session, model: str, version: str, limit: int) -> dict[str, Any]:
    """Devices by state for one release, and the figures of its smoke failures."""
    states = dict(
        s.execute(
            select(ReleaseState.state, func.count())
            .where(
                ReleaseState.model == model,
                ReleaseState.version == version,
                ReleaseState.active.is_(True),
            )
            .group_by(ReleaseState.state)
        )
        .tuples()
        .all()
    )
    failures = [
        {"device_id": d, "state": st, "detail": det, "updated_at": at}
        for d, st, det, at in s.execute(
            select(
                Device.device_id, ReleaseState.state, ReleaseState.detail, ReleaseState.updated_at
            )
            .join(Device, Device.id == ReleaseState.device_pk)
            .where(
                ReleaseState.model == model,
                ReleaseState.version == version,
                ReleaseState.state.in_(
                    ("smoke_failed", "reverted", "security", "failed", "refused")
                ),
            )
            .order_by(ReleaseState.updated_at.desc())
            .limit(limit)
        )
    ]
    running = s.scalar(
        select(func.count())
        .select_from(DeviceModel)
        .where(
            DeviceModel.model == model,
            DeviceModel.version == version,
            DeviceModel.active.is_(True),
        )
    )
    return {
        "model": model,
        "version": version,
        "states": states,
        "confirmed": states.get("confirmed", 0),
        "running": running or 0,
        "failures": failures,
    }


def audit_log(s: Session, limit: int) -> list[dict[str, Any]]:
    return [
        {"at": a.at, "actor": a.actor, "action": a.action, "target": a.target, "detail": a.detail}
        for a in s.scalars(select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit))
    ]


def prune_batch(s: Session, before: float, batch: int) -> int:
    """Delete up to ``batch`` events received before ``before``, oldest first, in one short
    transaction; raise each touched queue's ``pruned_seq`` so a resend of a pruned event is
    still a duplicate.

    The devices of those events are locked first (``FOR UPDATE``, in id order, so two
    prunes cannot deadlock), as a report locks its device before reading the queue: without
    it a report that read ``pruned_seq`` just before this commits would store a resent event
    again after its row is gone (stored twice, counted twice). SQLite serialises writers."""
    found = s.execute(
        select(Event.id, Event.device_pk)
        .where(Event.received_at < before)
        .order_by(Event.id)
        .limit(batch)
    ).all()
    if not found:
        return 0
    ids = [i for i, _ in found]
    s.execute(
        select(Device.id)
        .where(Device.id.in_(sorted({pk for _, pk in found})))
        .order_by(Device.id)
        .with_for_update()
    ).all()
    marks = s.execute(  # rows a concurrent prune deleted meanwhile are gone from here too
        select(Event.device_pk, Event.epoch, func.max(Event.seq))
        .where(Event.id.in_(ids))
        .group_by(Event.device_pk, Event.epoch)
    ).all()
    table: Any = Queue.__table__
    q = table.c  # Core executemany (not the ORM's bulk update by primary key)
    if marks:
        s.connection().execute(
            update(table)
            .where(q.device_pk == bindparam("pk"), q.epoch == bindparam("ep"))
            .values(
                pruned_seq=case((q.pruned_seq < bindparam("m"), bindparam("m")), else_=q.pruned_seq)
            ),
            [{"pk": pk, "ep": ep, "m": m} for pk, ep, m in marks],
        )
    s.execute(delete(Event).where(Event.id.in_(ids)))
    return len(ids)
