"""telemetry aggregates, refused-summary counts, rollout webhook outbox (issue 9)

Revision ID: 0004
Revises: 0003 (written against 0002; re-chained after 0003 at the merge of the health branch)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_LAT = [f"lat_{i:02d}" for i in range(30)]


def _device_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["device_pk"], ["devices.id"], name=op.f(f"fk_{table}_device_pk_devices"),
        ondelete="CASCADE",
    )  # fmt: skip


def upgrade() -> None:
    op.create_table(
        "webhook_outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("body", sa.String(length=65536), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_outbox")),
    )
    with op.batch_alter_table("webhook_outbox", schema=None) as b:
        b.create_index("ix_webhook_outbox_state_next_at", ["state", "next_at"], unique=False)

    op.create_table(
        "telemetry_agg",
        sa.Column("device_pk", _ID, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("bucket", sa.Float(), nullable=False),
        sa.Column("summaries", sa.Integer(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("crashes", sa.BigInteger(), nullable=False),
        sa.Column("latency_sum_s", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        *[sa.Column(c, sa.BigInteger(), nullable=False) for c in _LAT],
        _device_fk("telemetry_agg"),
        sa.PrimaryKeyConstraint(
            "device_pk", "model", "version", "bucket", name=op.f("pk_telemetry_agg")
        ),
    )
    with op.batch_alter_table("telemetry_agg", schema=None) as b:
        b.create_index(
            "ix_telemetry_agg_model_version_bucket", ["model", "version", "bucket"], unique=False
        )

    op.create_table(
        "telemetry_bins",
        sa.Column("device_pk", _ID, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("bucket", sa.Float(), nullable=False),
        sa.Column("output", sa.String(length=128), nullable=False),
        sa.Column("spec", sa.String(length=120), nullable=False),
        sa.Column("bin", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        _device_fk("telemetry_bins"),
        sa.PrimaryKeyConstraint(
            "device_pk", "model", "version", "bucket", "output", "spec", "bin",
            name=op.f("pk_telemetry_bins"),
        ),
    )  # fmt: skip
    with op.batch_alter_table("telemetry_bins", schema=None) as b:
        b.create_index(
            "ix_telemetry_bins_model_version_bucket", ["model", "version", "bucket"], unique=False
        )

    op.create_table(
        "telemetry_rejections",
        sa.Column("device_pk", _ID, nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("last_at", sa.Float(), nullable=False),
        sa.Column("last_message", sa.String(length=300), nullable=False),
        _device_fk("telemetry_rejections"),
        sa.PrimaryKeyConstraint("device_pk", "reason", name=op.f("pk_telemetry_rejections")),
    )


def downgrade() -> None:
    op.drop_table("telemetry_rejections")
    with op.batch_alter_table("telemetry_bins", schema=None) as b:
        b.drop_index("ix_telemetry_bins_model_version_bucket")
    op.drop_table("telemetry_bins")
    with op.batch_alter_table("telemetry_agg", schema=None) as b:
        b.drop_index("ix_telemetry_agg_model_version_bucket")
    op.drop_table("telemetry_agg")
    with op.batch_alter_table("webhook_outbox", schema=None) as b:
        b.drop_index("ix_webhook_outbox_state_next_at")
    op.drop_table("webhook_outbox")
