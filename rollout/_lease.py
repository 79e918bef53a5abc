"""The controller lease: exactly one controller acts, however many service instances run.

A lease row (``rollout_lease``, name ``controller``) is taken or renewed by one conditional
``UPDATE`` (compare-and-set: it matches only when the caller already holds it or it has
lapsed) in its own short transaction. That is portable — SQLite serialises writers, and on
PostgreSQL the row lock taken by the ``UPDATE`` makes the second of two racing updates re-check
its ``WHERE`` against the first one's result (READ COMMITTED), so at most one matches. No
advisory lock is needed, and a dead holder's lease lapses after ``ttl``.

Invariants:

* at a given database time at most one holder's ``lease_until`` is in the future;
* ``epoch`` grows by one at each change of holder: an action carries the epoch it was decided
  under and is signed only after :func:`hold` confirms the lease again (a fencing check: a
  controller that stalled past its lease finds it lost and does not sign);
* lease times come from each controller's clock: instances must keep their clocks within a
  small fraction of ``ttl`` (NTP), as any lease needs.
"""

from __future__ import annotations

from sqlalchemy import Engine, case, or_, select, update
from sqlalchemy.orm import Session

from ota.fleet._rollout_models import RolloutLease

NAME = "controller"
DEFAULT_TTL_S = 30.0


def acquire(engine: Engine, holder: str, now: float, ttl: float = DEFAULT_TTL_S) -> int | None:
    """Take or renew the lease for ``holder`` until ``now + ttl``; its epoch, or ``None`` when
    another holder's lease is still running."""
    with Session(engine) as s, s.begin():
        got = s.execute(
            update(RolloutLease)
            .where(
                RolloutLease.name == NAME,
                or_(RolloutLease.holder == holder, RolloutLease.lease_until < now),
            )
            .values(
                epoch=case(
                    (RolloutLease.holder == holder, RolloutLease.epoch),
                    else_=RolloutLease.epoch + 1,
                ),
                holder=holder,
                lease_until=now + ttl,
            )
            .returning(RolloutLease.epoch)
            .execution_options(synchronize_session=False)
        ).all()  # one round trip: the new epoch comes back with the update (RETURNING)
        if len(got) != 1:
            return None
        return int(got[0][0])


def hold(s: Session, holder: str, epoch: int, now: float) -> bool:
    """Inside the caller's transaction: whether ``holder`` still holds the lease of ``epoch``
    at ``now``. Call it in the transaction that records an intent, and again just before
    signing."""
    row = s.execute(
        select(RolloutLease.holder, RolloutLease.epoch, RolloutLease.lease_until).where(
            RolloutLease.name == NAME
        )
    ).one_or_none()
    return (
        row is not None and row.holder == holder and row.epoch == epoch and row.lease_until >= now
    )


def release(engine: Engine, holder: str) -> None:
    """Give the lease up (a clean shutdown), so another instance takes over at once."""
    with Session(engine) as s, s.begin():
        s.execute(
            update(RolloutLease)
            .where(RolloutLease.name == NAME, RolloutLease.holder == holder)
            .values(lease_until=0.0)
        )
