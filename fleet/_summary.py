"""The fleet summary served from a cache recounted by one worker at a time (ADR 0007).

Counting the fleet (``_store.summary``) reads every device row, so its cost grows with the
fleet; an operator's dashboard polls it. ``GET /v1/fleet`` therefore serves the last count
(table ``fleet_summary``, one row) while it is younger than the caller's ``max_age``; when it
is older, the worker that wins a lease recounts and stores it, and the others keep serving
the previous count meanwhile.

Invariants:

* ``as_of`` is the time the figures were counted, and they are exact as of then: the count
  runs in one snapshot (PostgreSQL ``REPEATABLE READ``; a SQLite read transaction in WAL mode
  is one), so no report is half counted;
* at most one worker recounts at a time: the lease is taken by a conditional ``UPDATE``
  (compare-and-set on ``lease_until``) in its own short write transaction, so it needs no
  advisory lock and holds on both backends; a worker that dies mid-count loses the lease after
  ``LEASE_S`` and the next stale read takes it over;
* staleness is bounded: a reply with ``max_age=m`` was counted at most ``m`` seconds ago, or
  its count is being replaced (lease held; ``as_of`` older, at most ``m + LEASE_S``); with
  ``max_age=0`` the reply is always counted for this request (exact as of its ``as_of``);
* reports never write this table: ingestion has no row that every report contends on; and a
  summary never fails for want of the writer lock (SQLite held past its busy timeout): it
  serves the cached count or counts without storing, since reads go on in WAL mode.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from . import _store
from ._models import FleetSummaryCache

log = logging.getLogger("ota.fleet")
LEASE_S = 60.0  # a recount at 1 M devices takes seconds; a dead leaseholder is replaced after
ROW = 1


def _read(read_engine: Engine) -> tuple[float, Any] | None:
    with Session(read_engine) as s, s.begin():
        row = s.execute(
            select(FleetSummaryCache.as_of, FleetSummaryCache.data).where(
                FleetSummaryCache.id == ROW
            )
        ).one_or_none()
    if row is None or row.data is None:
        return None
    return float(row.as_of), row.data


def _claim(engine: Engine, now: float, max_age: float) -> bool:
    """Take the recount lease if the cache is older than ``max_age`` and nobody holds it."""
    with Session(engine) as s, s.begin():
        won = cast(
            "CursorResult[Any]",
            s.execute(
                update(FleetSummaryCache)
                .where(
                    FleetSummaryCache.id == ROW,
                    FleetSummaryCache.lease_until <= now,
                    FleetSummaryCache.as_of < now - max_age,
                )
                .values(lease_until=now + LEASE_S)
            ),
        ).rowcount
    if won:
        return True
    try:  # a database created without the migration's row: make it, then claim again
        with Session(engine) as s, s.begin():
            if s.get(FleetSummaryCache, ROW) is not None:
                return False
            s.execute(insert(FleetSummaryCache).values(id=ROW, as_of=0.0, lease_until=0.0))
    except IntegrityError:
        return False
    return _claim(engine, now, max_age)


def _count(read_engine: Engine, now: float, silent_after_s: float) -> dict[str, Any]:
    eng = read_engine
    if eng.dialect.name == "postgresql":
        eng = eng.execution_options(isolation_level="REPEATABLE READ")
    with Session(eng) as s, s.begin():
        return _store.summary(s, now, silent_after_s)


def _save(engine: Engine, as_of: float, data: dict[str, Any]) -> None:
    with Session(engine) as s, s.begin():
        s.execute(
            update(FleetSummaryCache)
            .where(FleetSummaryCache.id == ROW, FleetSummaryCache.as_of < as_of)
            .values(as_of=as_of, data=data, lease_until=0.0)
        )


def _release(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        s.execute(
            update(FleetSummaryCache).where(FleetSummaryCache.id == ROW).values(lease_until=0.0)
        )


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except OperationalError:
        log.warning("fleet summary cache not written (database busy); its lease will lapse")


def cached_summary(
    engine: Engine, read_engine: Engine, now: float, silent_after_s: float, max_age: float
) -> dict[str, Any]:
    """The fleet summary counted at most ``max_age`` seconds before ``now`` (see the module's
    invariants for the one exception), with ``as_of`` the time it was counted."""
    cached = _read(read_engine)
    if cached is not None and now - cached[0] <= max_age:
        return {**cached[1], "generated_at": now, "as_of": cached[0]}
    try:
        claimed = _claim(engine, now, max_age)
    except OperationalError:  # SQLite's writer lock held past the busy timeout: reads go on
        claimed = False
    if not claimed and cached is not None and max_age > 0:
        return {**cached[1], "generated_at": now, "as_of": cached[0]}  # being recounted
    try:
        data = _count(read_engine, now, silent_after_s)
    except BaseException:
        if claimed:
            _quietly(_release, engine)
        raise
    if claimed:  # not stored (the writer lock is busy): the lease lapses, the reply stands
        _quietly(_save, engine, now, data)
    return {**data, "generated_at": now, "as_of": now}
