"""batch message size: the batch size moves out of a batch's task options into a column of
its own (how a batch is split into messages, not what its results depend on)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BATCHES = sa.table(
    "batches",
    sa.column("id", sa.String(36)),
    sa.column("options", sa.JSON()),
    sa.column("message_size", sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("message_size", sa.Integer(), nullable=True))
    bind = op.get_bind()
    # One row per submit: few enough to move in Python, the same on SQLite and PostgreSQL.
    for row in bind.execute(sa.select(BATCHES.c.id, BATCHES.c.options)).all():
        options = dict(row.options or {})
        if "batch_size" not in options:
            continue
        size = options.pop("batch_size")
        bind.execute(
            sa.update(BATCHES)
            .where(BATCHES.c.id == row.id)
            .values(options=options, message_size=size if isinstance(size, int) else None)
        )


def downgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(BATCHES.c.id, BATCHES.c.options, BATCHES.c.message_size).where(
            BATCHES.c.message_size.is_not(None)
        )
    ).all()
    for row in rows:
        options = {**(row.options or {}), "batch_size": row.message_size}
        bind.execute(sa.update(BATCHES).where(BATCHES.c.id == row.id).values(options=options))
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("message_size")
