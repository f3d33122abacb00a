"""content index: files seen, results by content, model revisions, reuse

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("recipe", sa.String(64), nullable=True))
        batch.add_column(sa.Column("source_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("plan", sa.JSON(), nullable=True))
        batch.create_index("ix_batches_source_key", ["source_key"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("content_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("reused_from", sa.String(36), nullable=True))
        batch.create_index("ix_jobs_input", ["input"])
    op.create_table(
        "files",
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("inode", sa.BigInteger(), nullable=True),
        sa.Column("etag", sa.String(200), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("path", name="pk_files"),
    )
    op.create_index("ix_files_etag_size", "files", ["etag", "size"])
    op.create_table(
        "content_results",
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("recipe", sa.String(64), nullable=False),
        sa.Column("model_revision", sa.String(100), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_content_results_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint(
            "content_sha256", "recipe", "model_revision", name="pk_content_results"
        ),
    )
    op.create_table(
        "model_revisions",
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("revision", sa.String(100), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("task", "model", name="pk_model_revisions"),
    )


def downgrade() -> None:
    op.drop_table("model_revisions")
    op.drop_table("content_results")
    op.drop_index("ix_files_etag_size", table_name="files")
    op.drop_table("files")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_input")
        batch.drop_column("reused_from")
        batch.drop_column("content_sha256")
    with op.batch_alter_table("batches") as batch:
        batch.drop_index("ix_batches_source_key")
        batch.drop_column("plan")
        batch.drop_column("source_key")
        batch.drop_column("recipe")
