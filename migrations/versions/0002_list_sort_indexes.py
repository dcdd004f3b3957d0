"""indexes for list sorts across runs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 00:00:00

Checkpoint lists sort by ``(key, id)`` and stop after a page; runs list by ``(created_at, id)``.
Without an index on the sort key every such request scanned and sorted the whole table.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index("ix_runs_created_at_id", ["created_at", "id"], unique=False)
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index("ix_checkpoints_step_id", ["step", "id"], unique=False)
        batch_op.create_index("ix_checkpoints_created_at_id", ["created_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index("ix_checkpoints_created_at_id")
        batch_op.drop_index("ix_checkpoints_step_id")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_created_at_id")
