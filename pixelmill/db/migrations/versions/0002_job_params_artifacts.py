"""job params, artifacts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("params", sa.JSON(), nullable=True))
    op.create_table(
        "artifacts",
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("model_revision", sa.String(100), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("precision", sa.String(16), nullable=True),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_artifacts_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("key", name="pk_artifacts"),
        sa.UniqueConstraint("job_id", "index", name="uq_artifacts_job_index"),
    )


def downgrade() -> None:
    op.drop_table("artifacts")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("params")
