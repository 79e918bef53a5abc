"""The dashboard's reads: every list one page (keyset or bounded), every figure an aggregate
computed by the database over indexed derived rows — never a scan of the event log.

Invariant: the cost of a page is bounded by its page size and by the number of *groups* it
shows (models x versions, rings x tiers, stages), not by the number of events; the one
per-device scans (adoption over time of one model, counts by ring and tier) are single
``GROUP BY`` queries over indexed tables (measured in bench/dashboard_pages.py).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Integer, bindparam, cast, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from ota.fleet._models import Device, DeviceModel, Event, ReleaseState
from ota.fleet._rollout_models import Rollout, RolloutVerdict

PAGE = 50


def _bucket(s: Session, col: Any, width: float) -> ColumnElement[Any]:
    """``floor(col / width)`` on both backends (PostgreSQL's CAST rounds, SQLite's truncates;
    times are positive)."""
    if s.get_bind().dialect.name == "postgresql":
        return func.floor(col / width)
    return cast(col / width, Integer)


def adoption(s: Session, model: str, points: int = 24) -> dict[str, list[tuple[float, int]]]:
    """Devices now running each version of ``model``, cumulated by the time each moved to it
    (``device_models.updated_at``), in at most ``points`` buckets; the 6 largest versions."""
    now = time.time()
    lo = s.scalar(
        select(func.min(DeviceModel.updated_at)).where(
            DeviceModel.model == model, DeviceModel.active.is_(True)
        )
    )
    if lo is None:
        return {}
    width = max(60.0, (now - float(lo)) / points)
    b = _bucket(s, DeviceModel.updated_at, width)
    rows = s.execute(
        select(DeviceModel.version, b, func.count())
        .where(DeviceModel.model == model, DeviceModel.active.is_(True))
        .group_by(DeviceModel.version, b)
        .order_by(DeviceModel.version, b)
    ).all()
    per: dict[str, list[tuple[float, int]]] = {}
    for version, bucket, n in rows:
        acc = per.setdefault(str(version), [])
        total = (acc[-1][1] if acc else 0) + int(n)
        acc.append(((int(bucket) + 1) * width, total))
    top = sorted(per, key=lambda v: -per[v][-1][1])[:6]
    return {v: per[v] + [(now, per[v][-1][1])] for v in sorted(top)}


def by_ring_tier(s: Session) -> list[tuple[str, str, int]]:
    """Enrolled devices (revoked included) by ring and tier: an index-only scan of
    ``ix_devices_ring_tier`` (filtering out revoked devices would read every row: ≈ 8x slower
    at 100,000 devices; the fleet summary gives the revoked total)."""
    rows = s.execute(
        select(Device.ring, Device.tier, func.count())
        .group_by(Device.ring, Device.tier)
        .order_by(Device.ring, Device.tier)
        .limit(500)
    ).all()
    return [(str(r), str(t), int(n)) for r, t, n in rows]


def device_brief(d: Device) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "ring": d.ring,
        "tier": d.tier,
        "health": d.health,
        "last_seen": d.last_seen,
        "last_outcome": d.last_outcome,
        "last_outcome_model": d.last_outcome_model,
        "last_outcome_version": d.last_outcome_version,
        "last_outcome_at": d.last_outcome_at,
        "revoked": d.revoked_at is not None,
    }


def silent(s: Session, before: float, limit: int = 10) -> list[dict[str, Any]]:
    """The devices unheard of the longest (index on ``last_seen``)."""
    q = (
        select(Device)
        .where(Device.last_seen < before, Device.revoked_at.is_(None))
        .order_by(Device.last_seen)
        .limit(limit)
    )
    return [device_brief(d) for d in s.scalars(q)]


def problems(s: Session, limit: int = 10) -> list[dict[str, Any]]:
    """Devices whose latest outcome is a failure or a security refusal, newest first (index
    on ``health``: the work is bounded by the failing devices, not the fleet)."""
    q = (
        select(Device)
        .where(Device.health.in_(("failing", "security")), Device.revoked_at.is_(None))
        .order_by(Device.last_outcome_at.desc())
        .limit(limit)
    )
    return [device_brief(d) for d in s.scalars(q)]


def rollouts_page(
    s: Session, before: int | None, limit: int = PAGE
) -> tuple[list[Rollout], int | None]:
    q = select(Rollout).order_by(Rollout.id.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(Rollout.id < before)
    rows = list(s.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (int(rows[-1].id) if more else None)


def verdicts_page(
    s: Session, rid: int, before: int | None, limit: int = 20
) -> tuple[list[RolloutVerdict], int | None]:
    q = (
        select(RolloutVerdict)
        .where(RolloutVerdict.rollout_id == rid)
        .order_by(RolloutVerdict.id.desc())
        .limit(limit + 1)
    )
    if before is not None:
        q = q.where(RolloutVerdict.id < before)
    rows = list(s.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (int(rows[-1].id) if more else None)


def outcomes_by_ring(s: Session, model: str, version: str) -> dict[str, dict[str, int]]:
    """Distinct devices by enrolled ring and latest state of one release (one aggregate)."""
    rows = s.execute(
        select(Device.ring, ReleaseState.state, func.count())
        .join(Device, Device.id == ReleaseState.device_pk)
        .where(
            ReleaseState.model == model,
            ReleaseState.version == version,
            ReleaseState.active.is_(True),
        )
        .group_by(Device.ring, ReleaseState.state)
    ).all()
    out: dict[str, dict[str, int]] = {}
    for ring, state, n in rows:
        out.setdefault(str(ring), {})[str(state)] = int(n)
    return out


def device_page(
    s: Session, device_id: str, before: int | None, limit: int = PAGE
) -> dict[str, Any] | None:
    d = s.scalars(select(Device).where(Device.device_id == device_id)).one_or_none()
    if d is None:
        return None
    models = [
        {"model": m.model, "version": m.version, "counter": m.counter, "updated_at": m.updated_at}
        for m in s.scalars(
            select(DeviceModel).where(DeviceModel.device_pk == d.id).order_by(DeviceModel.model)
        )
    ]
    releases = [
        {"model": r.model, "version": r.version, "state": r.state, "updated_at": r.updated_at}
        for r in s.scalars(
            select(ReleaseState)
            .where(ReleaseState.device_pk == d.id)
            .order_by(ReleaseState.updated_at.desc())
            .limit(20)
        )
    ]
    q = select(Event).where(Event.device_pk == d.id).order_by(Event.id.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(Event.id < before)
    events = list(s.scalars(q))
    more = len(events) > limit
    events = events[:limit]
    return {
        "device": d,
        "models": models,
        "releases": releases,
        "events": events,
        "next": int(events[-1].id) if more else None,
    }


def release_devices(
    s: Session, model: str, version: str, after: str, limit: int = PAGE
) -> tuple[list[dict[str, Any]], str | None]:
    """Devices running ``model version`` now, by id (keyset)."""
    q = (
        select(Device)
        .join(DeviceModel, DeviceModel.device_pk == Device.id)
        .where(
            DeviceModel.model == model,
            DeviceModel.version == version,
            DeviceModel.active.is_(True),
        )
        .order_by(Device.device_id)
        .limit(limit + 1)
    )
    if after:
        q = q.where(Device.device_id > after)
    rows = list(s.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    return [device_brief(d) for d in rows], (rows[-1].device_id if more else None)


FAILED_STATES = ("smoke_failed", "reverted", "security", "failed", "refused")


def release_fleet(s: Session, model: str, version: str, limit: int = 20) -> dict[str, Any]:
    """Devices by latest state of one release (one aggregate), how many run it, and the
    newest failures."""
    states = {
        str(st): int(n)
        for st, n in s.execute(
            select(ReleaseState.state, func.count())
            .where(
                ReleaseState.model == model,
                ReleaseState.version == version,
                ReleaseState.active.is_(True),
            )
            .group_by(ReleaseState.state)
        ).all()
    }
    running = s.scalar(
        select(func.count())
        .select_from(DeviceModel)
        .where(
            DeviceModel.model == model,
            DeviceModel.version == version,
            DeviceModel.active.is_(True),
        )
    )
    failures = [
        {"device_id": d, "state": st, "updated_at": at}
        for d, st, at in s.execute(
            select(Device.device_id, ReleaseState.state, ReleaseState.updated_at)
            .join(Device, Device.id == ReleaseState.device_pk)
            .where(
                ReleaseState.model == model,
                ReleaseState.version == version,
                ReleaseState.state.in_(FAILED_STATES),
            )
            .order_by(ReleaseState.updated_at.desc())
            .limit(limit)
        ).all()
    ]
    return {
        "states": states,
        "confirmed": states.get("confirmed", 0),
        "running": int(running or 0),
        "failures": failures,
    }


def stage_latency(
    s: Session, model: str, version: str, baseline: str | None, ring: str, since: float,
    until: float | None = None,
) -> dict[str, list[int]]:  # fmt: skip
    """The summed latency buckets (``lat_00`` … ``lat_29``) of ``version`` and of ``baseline``
    reported by the unrevoked devices of ``ring`` over the buckets that overlap ``[since,
    until]`` (the stage's window, as the health gates read it). ``until`` defaults to now. A
    release with no telemetry is absent from the result.

    One ``GROUP BY version``, driven from the ring's devices (``ix_devices_ring_tier``) into
    ``telemetry_agg``'s primary key ``(device_pk, model, version, bucket)``: its cost is the
    ring's devices times the window's buckets, never the event log nor the other rings' rows.
    ``devices CROSS JOIN telemetry_agg`` fixes that order on SQLite, whose planner otherwise
    starts from ``ix_telemetry_agg_model_version_bucket`` and reads every ring's rows of both
    releases (measured at 100,000 devices: canary 121 -> 26 ms, pilot 182 -> 144 ms);
    PostgreSQL plans a cross join with a join condition as an inner join, freely. Cached by
    the Rollout page as its other fleet-wide aggregates.

    Unlike ``health.latency_p95`` (which keeps, for the baseline, only devices that still run
    it), every report of the baseline in the window counts: the chart shows the
    distributions, the gate's table its decision."""
    from ota.fleet._models import LATENCY_COLUMNS
    from ota.fleet._telemetry import bucket_of

    until = time.time() if until is None else until
    versions = [version, *([baseline] if baseline and baseline != version else [])]
    sums = ", ".join(f"SUM(a.{c})" for c in LATENCY_COLUMNS)  # fixed names, not input
    q = text(
        f"SELECT a.version, {sums} FROM devices d CROSS JOIN telemetry_agg a "  # noqa: S608
        "WHERE a.device_pk = d.id AND d.ring = :ring AND d.revoked_at IS NULL "
        "AND a.model = :model AND a.version IN :versions "
        "AND a.bucket >= :lo AND a.bucket <= :hi GROUP BY a.version"
    ).bindparams(bindparam("versions", expanding=True))
    rows = s.execute(
        q,
        {"ring": ring, "model": model, "versions": versions, "lo": bucket_of(since), "hi": until},
    ).all()
    out = {str(v): [int(c or 0) for c in counts] for v, *counts in rows}
    return {v: c for v, c in out.items() if sum(c)}
