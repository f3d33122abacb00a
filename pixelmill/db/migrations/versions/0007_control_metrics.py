"""control and the operator's view: cancelled jobs, batch priority and pause, workers, metric totals

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

OLD = ("queued", "running", "done", "failed")
NEW = (*OLD, "cancelled")


def _status(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name="job_status", native_enum=False, create_constraint=True, length=16)


def _allow(values: tuple[str, ...]) -> None:
    """The jobs.status CHECK constraint allows exactly ``values``. PostgreSQL changes the
    constraint in place; SQLite, which cannot alter a constraint, copies the table."""
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(op.f("ck_jobs_job_status"), "jobs", type_="check")
        listed = ", ".join(f"'{v}'" for v in values)
        op.create_check_constraint("job_status", "jobs", f"status IN ({listed})")
        return
    old = OLD if values == NEW else NEW
    with op.batch_alter_table("jobs", recreate="always") as batch:
        batch.alter_column("status", existing_type=_status(old), type_=_status(values),
                           existing_nullable=False)  # fmt: skip


def upgrade() -> None:
    _allow(NEW)
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("priority", sa.String(8), nullable=False, server_default="normal")
        )
        batch.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "workers",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("batch_id", sa.String(36), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("items", sa.BigInteger(), nullable=False),
        sa.Column("recent", sa.JSON(), nullable=False),
        sa.Column("memory_used", sa.BigInteger(), nullable=True),
        sa.Column("memory_total", sa.BigInteger(), nullable=True),
        sa.Column("utilization", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_workers"),
    )
    op.create_table(
        "metric_totals",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("key", sa.String(32), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", "task", "model", "device", "key", name="pk_metric_totals"),
    )


def downgrade() -> None:
    op.drop_table("metric_totals")
    op.drop_table("workers")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("cancelled_at")
        batch.drop_column("paused_at")
        batch.drop_column("priority")
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'cancelled'")
    _allow(OLD)
