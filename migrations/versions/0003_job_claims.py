"""conversion jobs claimed by one server process at a time

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 00:00:00

Several ``ckptd serve`` processes on one database claim queued jobs with a row lock
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and record who runs each one; the claimant renews
``heartbeat_at`` while it runs, so that a job whose process died is failed when the lease expires
instead of when any server restarts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversion_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
        batch_op.create_index("ix_conversion_jobs_status_id", ["status", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("conversion_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_conversion_jobs_status_id")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("claimed_by")
