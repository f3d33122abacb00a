"""A batch's job counts, read from the tallies the database's triggers keep (``job_tallies``,
migration 0011) instead of a scan of its jobs: the same few rows at ten jobs or ten million.

``fold`` (the reconciler, each pass) folds the rows PostgreSQL's statement triggers add into
one per (batch, state), so that reading stays a handful of rows. ``recount`` is the scan the
tallies stand for: tests hold the two equal through every fault they make.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import case, delete, func, insert, select
from sqlalchemy.orm import Session

from pixelmill.db.records import as_utc
from pixelmill.db.schema import Job, JobStatus, JobTally

REUSED = "reused"  # the tally of a batch's jobs done at submit with an earlier result
FOLD_AT = 64  # rows of one batch from which the reconciler folds them into one per state


@dataclass
class Tally:
    """One batch's counts: jobs per state, reused ones, and the first start and last finish
    its workers recorded (jobs done at submit left out). The times are the earliest and
    latest ever: a retried job's first run still counts."""

    by_status: dict[str, int] = field(default_factory=dict)
    reused: int = 0
    started_at: datetime | None = None
    last_finished_at: datetime | None = None


def tallies(session: Session, batch_ids: Collection[str]) -> dict[str, Tally]:
    """The tallies of ``batch_ids`` (a batch with no jobs: empty), in one query."""
    out = {batch_id: Tally() for batch_id in batch_ids}
    if not out:
        return out
    rows = session.execute(
        select(
            JobTally.batch_id,
            JobTally.status,
            func.sum(JobTally.n),
            func.min(JobTally.first_at),
            func.max(JobTally.last_at),
        )
        .where(JobTally.batch_id.in_(out))
        .group_by(JobTally.batch_id, JobTally.status)
    )
    for batch_id, status, n, first, last in rows:
        tally = out[batch_id]
        if status == REUSED:
            tally.reused = int(n)
            continue
        if n:
            tally.by_status[status] = int(n)
        tally.started_at = _earliest(tally.started_at, as_utc(first))
        tally.last_finished_at = _latest(tally.last_finished_at, as_utc(last))
    return out


def count_new(session: Session, batch_id: str, *, queued: int, reused: int) -> None:
    """Tally a new batch's jobs (``create_batch``: ``queued`` of them queued, ``reused`` done at
    submit with an earlier result). The triggers count every later change; inserting jobs is
    counted here, once, rather than by a trigger per row (which halved a submit's speed on
    SQLite)."""
    rows = [(JobStatus.queued.value, queued), (JobStatus.done.value, reused), (REUSED, reused)]
    session.execute(
        insert(JobTally),
        [{"batch_id": batch_id, "status": status, "n": n} for status, n in rows if n],
    )


def tally(session: Session, batch_id: str) -> Tally:
    return tallies(session, [batch_id])[batch_id]


def recount(session: Session, batch_id: str) -> Tally:
    """The same figures from a scan of the batch's jobs (what the tallies spare a reader)."""
    out = Tally()
    reused = Job.reused_from.is_not(None)
    for status, was_reused, n in session.execute(
        select(Job.status, reused, func.count())
        .where(Job.batch_id == batch_id)
        .group_by(Job.status, reused)
    ):
        key = JobStatus(status).value
        out.by_status[key] = out.by_status.get(key, 0) + n
        if was_reused:
            out.reused += n
    started, last = session.execute(
        select(
            func.min(Job.started_at),
            func.max(case((Job.reused_from.is_(None), Job.finished_at))),
        ).where(Job.batch_id == batch_id)
    ).one()
    out.started_at, out.last_finished_at = as_utc(started), as_utc(last)
    return out


def fold(session: Session, *, at_least: int = FOLD_AT) -> int:
    """Fold each batch with ``at_least`` tally rows into one row per state (the same sums,
    first and last times). Safe beside writers: it deletes the rows it read, by id, and
    inserts their sums in the same transaction; rows added meanwhile stay as they are.
    Returns how many rows it removed.

    PostgreSQL only: SQLite's triggers keep one row per state already, and its driver reads
    outside the transaction it writes in (pysqlite begins one at the first write), so a fold
    there could write back sums read before a worker's change."""
    if session.get_bind().dialect.name == "sqlite":
        return 0
    crowded = session.scalars(
        select(JobTally.batch_id)
        .group_by(JobTally.batch_id)
        .having(func.count() >= at_least)
        .limit(100)
    ).all()
    removed = 0
    for batch_id in crowded:
        rows = session.execute(
            select(JobTally.id, JobTally.status, JobTally.n, JobTally.first_at, JobTally.last_at)
            .where(JobTally.batch_id == batch_id)
            .with_for_update(skip_locked=True)
        ).all()
        if len(rows) < 2:
            continue
        sums: dict[str, list[object]] = {}
        for _id, status, n, first, last in rows:
            entry = sums.setdefault(status, [0, None, None])
            entry[0] = int(entry[0]) + int(n)  # type: ignore[call-overload]
            entry[1] = _earliest(entry[1], first)  # type: ignore[arg-type]
            entry[2] = _latest(entry[2], last)  # type: ignore[arg-type]
        ids = [row[0] for row in rows]
        for start in range(0, len(ids), 1000):
            session.execute(delete(JobTally).where(JobTally.id.in_(ids[start : start + 1000])))
        session.execute(
            insert(JobTally),
            [
                {
                    "batch_id": batch_id,
                    "status": status,
                    "n": n,
                    "first_at": first,
                    "last_at": last,
                }  # fmt: skip
                for status, (n, first, last) in sums.items()
            ],
        )
        removed += len(ids) - len(sums)
    return removed


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)
