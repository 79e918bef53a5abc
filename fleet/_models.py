"""The fleet database: raw events plus derived state kept up to date at ingest.

Times are UNIX seconds (float) everywhere, so SQLite and PostgreSQL compare them the same way.
``received_at`` is the service's clock, ``device_time`` the device's (kept, never trusted).

Derived tables (``device_models``, ``release_states``, the device row's facts and health) are
written in the same transaction as the events that change them: a committed report and its
derived state cannot disagree, and queries aggregate indexed rows, never the event log.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BigInteger autoincrement that SQLite also turns into a rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Device(Base):
    """One enrolled device. ``ring``/``tier`` are fixed at enrolment; ``claimed_*`` and the
    versions are what its latest report said."""

    __tablename__ = "devices"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), unique=True)
    credential_hash: Mapped[str] = mapped_column(String(64))
    ring: Mapped[str] = mapped_column(String(64), default="")
    tier: Mapped[str] = mapped_column(String(64), default="")
    claimed_ring: Mapped[str] = mapped_column(String(64), default="")
    claimed_tier: Mapped[str] = mapped_column(String(64), default="")
    arch: Mapped[str] = mapped_column(String(64), default="")
    runtime_version: Mapped[str] = mapped_column(String(64), default="")
    client_version: Mapped[str] = mapped_column(String(64), default="")
    enrolled_at: Mapped[float] = mapped_column(Float)
    enrolled_by: Mapped[str] = mapped_column(String(64), default="")
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    last_device_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_kind: Mapped[str] = mapped_column(String(32), default="")
    last_outcome: Mapped[str] = mapped_column(String(32), default="")
    last_outcome_model: Mapped[str] = mapped_column(String(128), default="")
    last_outcome_version: Mapped[str] = mapped_column(String(64), default="")
    last_outcome_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    health: Mapped[str] = mapped_column(String(16), default="unknown", index=True)
    claims_changed: Mapped[bool] = mapped_column(Boolean, default=False)
    claims_note: Mapped[str] = mapped_column(String(512), default="")
    models_digest: Mapped[str] = mapped_column(String(64), default="")  # of the last models
    events_total: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped_total: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_window_start: Mapped[float] = mapped_column(Float, default=0.0)
    rate_count: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_devices_ring_tier", "ring", "tier"),
        # unique: a secret names one enrolment (two enrolments racing with one proposal: the
        # second is a 409); and an indexed lookup for enrolment's "already taken" check
        Index("ix_devices_credential_hash", "credential_hash", unique=True),
    )


class Queue(Base):
    """One event-queue epoch of one device. ``high_seq``: the highest seq stored (events
    below it arriving late are stored but move no derived state). ``pruned_seq``: the highest
    seq pruned, so a resend of a pruned event is still known as a duplicate."""

    __tablename__ = "queues"
    device_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[str] = mapped_column(String(64), primary_key=True)
    high_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    pruned_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    first_seen: Mapped[float] = mapped_column(Float)


class Event(Base):
    """One event as the device sent it, with the time it was received."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_pk: Mapped[int] = mapped_column(BigId, ForeignKey("devices.id", ondelete="CASCADE"))
    epoch: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(128), default="")
    version: Mapped[str] = mapped_column(String(64), default="")
    device_time: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    data: Mapped[Any] = mapped_column(JSON)

    __table_args__ = (
        UniqueConstraint("device_pk", "epoch", "seq", name="uq_events_device_epoch_seq"),
        Index("ix_events_device_pk_id", "device_pk", "id"),
    )


class DeviceModel(Base):
    """What a device said it runs (its report's ``device.models``). ``ring``, ``tier`` and
    ``active`` (not revoked) copy the device's, so the fleet summary aggregates this table
    alone (an index-only scan, no join): kept in step by enrolment and revocation."""

    __tablename__ = "device_models"
    device_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    counter: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[float] = mapped_column(Float)
    ring: Mapped[str] = mapped_column(String(64), default="")
    tier: Mapped[str] = mapped_column(String(64), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    __table_args__ = (
        Index("ix_device_models_model_version", "model", "version", "ring", "tier", "active"),
    )


class ReleaseState(Base):
    """Where one release stands on one device: the latest state its events put it in.
    ``active`` copies the device's (not revoked), so counts need no join."""

    __tablename__ = "release_states"
    device_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    detail: Mapped[Any] = mapped_column(JSON, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    __table_args__ = (
        Index("ix_release_states_model_version_state", "model", "version", "state", "active"),
    )


class OperatorToken(Base):
    """A scoped API token; only its SHA-256 is stored."""

    __tablename__ = "operator_tokens"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class EnrollToken(Base):
    """An enrolment token: expiring, usable ``max_uses`` times, optionally bound to a ring
    and tier that then become the device's."""

    __tablename__ = "enroll_tokens"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    ring: Mapped[str] = mapped_column(String(64), default="")
    tier: Mapped[str] = mapped_column(String(64), default="")
    max_uses: Mapped[int] = mapped_column(Integer, default=1)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    expires_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditRecord(Base):
    """Every state-changing operator call, with the name of the token that made it."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(160))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[Any] = mapped_column(JSON, nullable=True)


class FleetSummaryCache(Base):
    """The last fleet summary counted (``data``), exact as of ``as_of``, and the lease of
    the one worker recounting it (``lease_until``): a read serves this row while it is younger
    than the caller's ``max_age``, so a summary costs one primary-key read whatever the fleet's
    size, and no report writes here (no hot row on the ingest path). See ADR 0007."""

    __tablename__ = "fleet_summary"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    as_of: Mapped[float] = mapped_column(Float, default=0.0)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    data: Mapped[Any] = mapped_column(JSON, nullable=True)


from . import _rollout_models  # noqa: E402, F401  (issue 9: the rollout tables, same metadata)
