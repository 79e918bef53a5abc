"""unique index on devices.credential_hash

Enrolment checks that a proposed credential is not already another device's (``credential
_taken``): without an index that is a scan of every device (≈ 6 ms at 100,000 devices). The
index is unique, so two enrolments racing with the same proposal on PostgreSQL cannot both
commit (the second gets 409), which the check alone could not promise. Existing hashes are
SHA-256 digests of 256-bit random secrets, so they are distinct.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_devices_credential_hash", "devices", ["credential_hash"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_devices_credential_hash", table_name="devices")
