"""rollouts, their verdicts and the controller lease (issue 9, ADR 0011)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("baseline_version", sa.String(64), nullable=False),
        sa.Column("live_model", sa.String(128), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("plan_sha256", sa.String(64), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("stage_started_at", sa.Float(), nullable=False),
        sa.Column("approved_stage", sa.Integer(), nullable=False),
        sa.Column("pending", sa.JSON(), nullable=True),
        sa.Column("request", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(160), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
        sa.UniqueConstraint("live_model", name=op.f("uq_rollouts_live_model")),
    )
    op.create_index("ix_rollouts_model_state", "rollouts", ["model", "state"])
    op.create_table(
        "rollout_verdicts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("rollout_id", BigId, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("last_at", sa.Float(), nullable=False),
        sa.Column("repeats", sa.Integer(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("acted", sa.Boolean(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_verdicts_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_verdicts")),
    )
    op.create_index(
        op.f("ix_rollout_verdicts_rollout_id"), "rollout_verdicts", ["rollout_id"], unique=False
    )
    op.create_table(
        "rollout_lease",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rollout_lease")),
    )
    op.execute(
        "INSERT INTO rollout_lease (name, holder, lease_until, epoch) "
        "VALUES ('controller', '', 0, 0)"
    )


def downgrade() -> None:
    op.drop_table("rollout_lease")
    op.drop_index(op.f("ix_rollout_verdicts_rollout_id"), table_name="rollout_verdicts")
    op.drop_table("rollout_verdicts")
    op.drop_index("ix_rollouts_model_state", table_name="rollouts")
    op.drop_table("rollouts")
