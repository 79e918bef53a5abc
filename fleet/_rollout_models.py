"""Tables of the rollout controller (issue 9, ADR 0011), on the fleet database's metadata.

* ``rollouts``: one row per rollout of one release, with its validated plan, its stage, its
  state and the controller's *intent* (``pending``): an action recorded before it is signed,
  so a controller killed between signing and recording finishes it without signing twice.
  ``live_model`` is the model while the rollout runs or is paused, ``NULL`` once it ends: its
  unique constraint makes "one live rollout per model" hold on both backends (NULLs are
  distinct in SQLite and PostgreSQL), whatever two operators race.
* ``rollout_verdicts``: every distinct verdict with its gates' evidence; a verdict equal to the
  previous one only bumps ``repeats`` and ``last_at`` (the table grows with changes, not ticks).
* ``rollout_lease``: one row per lease; the controller that holds ``controller`` acts.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from ._models import Base, BigId

# rollout states: running (gates judged each tick), paused (by a verdict or an operator;
# resume continues), done (the last stage passed), rolled_back (yanked), aborted (operator)
LIVE_STATES = ("running", "paused")
END_STATES = ("done", "rolled_back", "aborted")


class Rollout(Base):
    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    baseline_version: Mapped[str] = mapped_column(String(64), default="")
    live_model: Mapped[str | None] = mapped_column(String(128), nullable=True, unique=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(1024), default="")
    plan: Mapped[Any] = mapped_column(JSON)
    plan_sha256: Mapped[str] = mapped_column(String(64))
    stage: Mapped[int] = mapped_column(Integer, default=-1)  # -1 until the first is entered
    stage_started_at: Mapped[float] = mapped_column(Float, default=0.0)
    approved_stage: Mapped[int] = mapped_column(Integer, default=-1)
    pending: Mapped[Any] = mapped_column(JSON, nullable=True)  # the intent being carried out
    request: Mapped[Any] = mapped_column(JSON, nullable=True)  # an operator's, not yet done
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(160), default="")
    updated_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_rollouts_model_state", "model", "state"),)


class RolloutVerdict(Base):
    __tablename__ = "rollout_verdicts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[float] = mapped_column(Float)
    last_at: Mapped[float] = mapped_column(Float)
    repeats: Mapped[int] = mapped_column(Integer, default=1)
    stage: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(1024), default="")
    acted: Mapped[bool] = mapped_column(Boolean, default=False)
    digest: Mapped[str] = mapped_column(String(64), default="")  # of action + gate statuses
    gates: Mapped[Any] = mapped_column(JSON)


class RolloutLease(Base):
    __tablename__ = "rollout_lease"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), default="")
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    epoch: Mapped[int] = mapped_column(Integer, default=0)  # +1 at each change of holder
