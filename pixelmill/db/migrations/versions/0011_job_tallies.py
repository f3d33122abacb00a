"""job tallies: a batch's job counts per state (and the reused ones, and its first start and
last finish), kept by triggers on jobs, so that `status`, `wait` and the dashboard read a few
rows instead of scanning a million jobs (``pixelmill.db.tallies``)

Triggers, not the code that changes jobs: every change of a job's state counts, whatever
statement made it (a claim, a finish, a cancel, the reconciler, a future feature or an
operator's own SQL). New jobs are the exception: ``create_batch``, the one place that inserts
jobs, counts its batch once they are in (``pixelmill.db.tallies.count_new``, one GROUP BY over
the batch's index), which costs a submit far less than a trigger per row (SQLite: 40,000 jobs/s
registered instead of 21,000).

- PostgreSQL: one statement-level trigger per UPDATE and DELETE, over the statement's
  transition tables: a statement adds one row per (batch, state) it changed, so concurrent
  workers never wait on one counter row; the reconciler folds a batch's rows into one per state.
- SQLite: row-level triggers keep one row per (batch, state) in place (SQLite has one writer at
  a time anyway).

A later migration that rebuilds the jobs table on SQLite (``batch_alter_table``) drops these
triggers with the old table: it must create them again (``sqlite_triggers()``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

PG_FUNCTION = """
CREATE FUNCTION pixelmill_tally_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO job_tallies (batch_id, status, n)
    SELECT batch_id, status, -count(*) FROM old_rows GROUP BY batch_id, status
    UNION ALL
    SELECT batch_id, 'reused', -count(*)
      FROM old_rows WHERE reused_from IS NOT NULL GROUP BY batch_id;
  ELSE
    -- Every UPDATE of jobs runs this (a trigger with transition tables cannot name columns);
    -- one that changed no job's state (a lease renewed) adds nothing.
    INSERT INTO job_tallies (batch_id, status, n, first_at, last_at)
    SELECT batch_id, status, sum(d), min(s), max(f) FROM (
      SELECT o.batch_id, o.status, -1 AS d, NULL::timestamptz AS s, NULL::timestamptz AS f
        FROM old_rows o
      UNION ALL
      SELECT n.batch_id, n.status, 1, n.started_at,
             CASE WHEN n.reused_from IS NULL THEN n.finished_at END
        FROM new_rows n
    ) changed GROUP BY batch_id, status HAVING sum(d) <> 0;
  END IF;
  RETURN NULL;
END $$
"""

PG_TRIGGERS = [
    "CREATE TRIGGER jobs_tally_update AFTER UPDATE ON jobs "
    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION pixelmill_tally_jobs()",
    "CREATE TRIGGER jobs_tally_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION pixelmill_tally_jobs()",
]


def _sqlite_bump(row: str, status: str, sign: str, *, times: bool) -> str:
    """SQLite: add ``sign`` 1 to the (batch, ``status``) row of job ``row`` (NEW or OLD), or
    make that row if there is none (``changes()``: what the trigger's last statement changed);
    with ``times``, fold the job's start and finish in."""
    sets = [f"n = n {sign} 1"]
    if times:
        sets += [
            f"first_at = CASE WHEN first_at IS NULL OR {row}.started_at < first_at "
            f"THEN coalesce({row}.started_at, first_at) ELSE first_at END",
            f"last_at = CASE WHEN {row}.reused_from IS NULL AND "
            f"(last_at IS NULL OR {row}.finished_at > last_at) "
            f"THEN coalesce({row}.finished_at, last_at) ELSE last_at END",
        ]
    first = f"{row}.started_at" if times else "NULL"
    last = f"CASE WHEN {row}.reused_from IS NULL THEN {row}.finished_at END" if times else "NULL"
    return (
        f"UPDATE job_tallies SET {', '.join(sets)} "
        f"WHERE batch_id = {row}.batch_id AND status = {status}; "
        f"INSERT INTO job_tallies (batch_id, status, n, first_at, last_at) "
        f"SELECT {row}.batch_id, {status}, {sign}1, {first}, {last} WHERE changes() = 0;"
    )


def sqlite_triggers() -> list[str]:
    """One row per (batch, state), changed in place: SQLite has one writer at a time."""
    new = _sqlite_bump("NEW", "NEW.status", "+", times=True)
    old = _sqlite_bump("OLD", "OLD.status", "-", times=False)
    reused_old = _sqlite_bump("OLD", "'reused'", "-", times=False)
    return [
        "CREATE TRIGGER jobs_tally_update AFTER UPDATE OF status ON jobs "
        f"WHEN OLD.status IS NOT NEW.status BEGIN {old} {new} END",
        f"CREATE TRIGGER jobs_tally_delete AFTER DELETE ON jobs BEGIN {old} END",
        "CREATE TRIGGER jobs_tally_delete_reused AFTER DELETE ON jobs "
        "WHEN OLD.reused_from IS NOT NULL BEGIN "
        f"{reused_old} END",
    ]


# What the jobs hold now, counted once; after the triggers exist (on PostgreSQL, creating them
# locks jobs against writes until this migration commits: nothing is counted twice or missed).
BACKFILL = """
INSERT INTO job_tallies (batch_id, status, n, first_at, last_at)
SELECT batch_id, status, count(*), min(started_at),
       max(CASE WHEN reused_from IS NULL THEN finished_at END)
  FROM jobs GROUP BY batch_id, status
UNION ALL
SELECT batch_id, 'reused', count(*), NULL, NULL
  FROM jobs WHERE reused_from IS NOT NULL GROUP BY batch_id
"""


TRIGGERS = (
    "jobs_tally_update",
    "jobs_tally_delete",
    "jobs_tally_delete_reused",
)


def upgrade() -> None:
    op.create_table(
        "job_tallies",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_tallies")),
    )
    op.create_index("ix_job_tallies_batch_status", "job_tallies", ["batch_id", "status"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        for ddl in PG_TRIGGERS:
            op.execute(ddl)
    else:
        for ddl in sqlite_triggers():
            op.execute(ddl)
    op.execute(BACKFILL)


def downgrade() -> None:
    for name in TRIGGERS:
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON jobs")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS pixelmill_tally_jobs()")
    op.drop_index("ix_job_tallies_batch_status", table_name="job_tallies")
    op.drop_table("job_tallies")
