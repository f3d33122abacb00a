"""embeddings: one image embedding per embed job (and pgvector's column where it is installed)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

log = logging.getLogger("pixelmill.db.migrations")


def upgrade() -> None:
    op.create_table(
        "embeddings",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("model_revision", sa.String(100), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_embeddings_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name="pk_embeddings"),
    )
    op.create_index("ix_embeddings_model", "embeddings", ["model", "model_revision", "dim"])
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # A 512-d vector is 2 KB, just past PostgreSQL's TOAST threshold: kept out of line, a scan
    # fetched each one separately (minutes per million). MAIN keeps it in the row.
    bind.exec_driver_sql("ALTER TABLE embeddings ALTER COLUMN vector SET STORAGE MAIN")
    # pgvector where the server has it: a savepoint, so that a server without the extension
    # (or a role that may not create it) leaves the migration's transaction usable.
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS vector")
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        # INFO: the command that migrates is often `pixelmill run`, whose stderr a script reads;
        # the worker that writes embeddings says it once in its log (pixelmill.db.embeddings).
        log.info(
            "pgvector is not available (%s): embeddings are stored as blobs and search scans "
            "them (not indexed)",
            reason,
        )
        return
    bind.exec_driver_sql("ALTER TABLE embeddings ADD COLUMN vec vector")


def downgrade() -> None:
    op.drop_index("ix_embeddings_model", table_name="embeddings")
    op.drop_table("embeddings")
