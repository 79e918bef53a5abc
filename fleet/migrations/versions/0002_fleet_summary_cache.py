"""fleet summary cache (one row, recounted by one leaseholder at a time)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet_summary",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("as_of", sa.Float(), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleet_summary")),
    )
    op.execute("INSERT INTO fleet_summary (id, as_of, lease_until) VALUES (1, 0, 0)")


def downgrade() -> None:
    op.drop_table("fleet_summary")
