"""batch windows: a batch's share (its weight among the batches of its priority), and an index
that finds a batch's queued jobs with a message on the broker (a lease) apart from its backlog
(none), in submit order; it takes the place of (batch_id, status), which is its prefix

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("share", sa.Integer(), nullable=False, server_default="1"))
    op.create_index("ix_jobs_batch_window", "jobs", ["batch_id", "status", "lease_until", "seq"])
    op.drop_index("ix_jobs_batch_status", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_batch_status", "jobs", ["batch_id", "status"])
    op.drop_index("ix_jobs_batch_window", table_name="jobs")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("share")
