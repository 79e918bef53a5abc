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

    __table_args__ = (Index("ix_devices_ring_tier", "ring", "tier"),)


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


# -- issue 9: inference telemetry folded at ingest, and the rollout webhook outbox ----------

LATENCY_COLUMNS = tuple(f"lat_{i:02d}" for i in range(30))  # edge-ota.telemetry/1 buckets


class TelemetryAgg(Base):
    """The telemetry summaries of one device for one release, added up per time bucket (by
    the service's receipt time, ``bucket`` = its start, UNIX seconds): counts only, so rows are
    folded with ``col = col + excluded.col`` and the rollout gates sum them per device over a
    window with SQL. ``lat_00`` … ``lat_29`` are the fixed latency buckets (ADR 0009)."""

    __tablename__ = "telemetry_agg"
    device_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[float] = mapped_column(Float, primary_key=True)
    summaries: Mapped[int] = mapped_column(Integer, default=0)
    inferences: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    crashes: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_sum_s: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float)
    lat_00: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_01: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_02: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_03: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_04: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_05: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_06: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_07: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_08: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_09: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_10: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_11: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_12: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_13: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_14: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_15: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_16: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_17: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_18: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_19: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_20: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_21: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_22: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_23: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_24: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_25: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_26: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_27: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_28: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_29: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (Index("ix_telemetry_agg_model_version_bucket", "model", "version", "bucket"),)


class TelemetryBin(Base):
    """One output bin of one device's summaries for one release and time bucket. ``spec`` is
    the output's binning (``hist:<lo>:<hi>:<bins>`` or ``classes``), part of the key so that
    counts made with different bins are never added up. ``bin``: a histogram bin index, -1
    under, -2 over, -3 NaN; or a class id, -1 other."""

    __tablename__ = "telemetry_bins"
    device_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[float] = mapped_column(Float, primary_key=True)
    output: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec: Mapped[str] = mapped_column(String(120), primary_key=True)
    bin: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        Index("ix_telemetry_bins_model_version_bucket", "model", "version", "bucket"),
    )


class TelemetryRejection(Base):
    """Telemetry summaries refused from one device, by reason (``malformed``, ``wrong_version``,
    ``future``, ``too_many``, ``mismatch``): counted, the last message kept."""

    __tablename__ = "telemetry_rejections"
    device_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_at: Mapped[float] = mapped_column(Float)
    last_message: Mapped[str] = mapped_column(String(300), default="")


class WebhookOutbox(Base):
    """One rollout notification waiting for delivery (``ota.rollout._webhook``): enqueued in
    the transaction that records the verdict, delivered at least once with bounded retries.
    ``state``: ``pending`` (due at ``next_at``), ``delivered``, or ``dead`` (retries spent;
    kept, an operator may requeue it)."""

    __tablename__ = "webhook_outbox"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[float] = mapped_column(Float)
    event: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(String(65536))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str] = mapped_column(String(300), default="")

    __table_args__ = (Index("ix_webhook_outbox_state_next_at", "state", "next_at"),)


from . import _rollout_models  # noqa: E402, F401  (issue 9: the rollout tables, same metadata)
