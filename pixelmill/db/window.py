"""A batch's window: the few of its queued jobs that have a message on the broker.

The database holds a batch's backlog; the broker holds only its window, PIXELMILL_WINDOW
messages times the batch's share. A queued job is in one of two places:

- in the window: ``lease_until`` set. Its message is on the broker (or was lost: when the
  lease runs out while the queue is empty, the reconciler sends it again, as it always has);
- in the backlog: ``lease_until`` NULL. It has no message; nothing will run it until it is
  moved into the window.

A worker that claims a message's jobs moves the same batch's next jobs (in submit order) from
backlog to window in the claim's own transaction, and sends their message after the commit:
the database is the outbox. A worker that dies between the commit and the send leaves jobs
leased in the window without a message, which the reconciler sends again once their lease runs
out; jobs are never lost, and a second message for a job is harmless (its claim finds it taken).

Fair share follows from the broker's order: messages of one priority are taken first in, first
out, and each batch puts a message back for each one taken, so active batches of a priority take
turns in proportion to their windows (share 2 keeps twice the messages, and gets twice the
turns). A batch submitted behind a big one waits for the messages already queued, not for its
backlog. Priorities stay strict: each has its own list, and the highest is always taken first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, func, or_, select, update
from sqlalchemy.orm import Session

from pixelmill.catalog import message_size
from pixelmill.db.records import TERMINAL, JobStatus
from pixelmill.db.schema import Batch, Job, JobTally, utcnow

JOBS = cast(Table, Job.__table__)
BATCHES = cast(Table, Batch.__table__)
# "Not finished", beside `id IN (...)`: a job the statement found queued in this transaction
# (the rows are locked on PostgreSQL; SQLite's writers take turns) and that nothing else
# finished meanwhile. Written as NOT IN, as in ``db.jobs``, so that SQLite walks the primary
# key: `status = 'queued' AND lease_until IS NULL` made it scan the (status, lease_until)
# index over a whole backlog, 0.12 s a claim at 100,000 queued jobs.
STILL_QUEUED = JOBS.c.status.not_in(TERMINAL)


@dataclass(frozen=True)
class Window:
    """Jobs of one batch to send, after the commit that moved them into its window: in
    messages of ``size`` at ``priority``."""

    batch_id: str
    job_ids: list[str]
    size: int
    priority: str


def window_jobs(size: int, share: int, window: int) -> int:
    """How many of a batch's queued jobs have a message at once: ``window`` messages of
    ``size`` per unit of its ``share``."""
    return size * window * max(1, share)


def open_window(session: Session, batch_id: str, *, window: int, lease: float) -> Window:
    """The batch's window, to send (again): its queued jobs that have a message already (a
    resume or a new priority needs new ones; an old message that is still queued becomes a
    duplicate, which claims nothing), topped up from its backlog. Every one is leased for
    ``lease`` seconds from now. Nothing for a paused or cancelled batch."""
    session.flush()
    conn = session.connection()
    batch = _batch(conn, batch_id)
    size = message_size(batch.message_size)
    if batch.paused_at is not None or batch.cancelled_at is not None:
        return Window(batch_id, [], size, batch.priority)
    held = conn.execute(
        select(JOBS.c.id, JOBS.c.seq)
        .where(*_queued(batch_id), JOBS.c.lease_until.is_not(None))
        .order_by(JOBS.c.seq)
    ).all()
    now = utcnow()
    rows: list[Any] = list(held)
    if rows:
        conn.execute(
            update(JOBS)
            .where(JOBS.c.id.in_([r.id for r in rows]), STILL_QUEUED)
            .values(lease_until=now + timedelta(seconds=lease))
        )
    wanted = window_jobs(size, batch.share, window) - len(rows)
    if wanted > 0:
        rows += _from_backlog(conn, batch_id, wanted, lease=lease, now=now)
    rows.sort(key=lambda r: r.seq)
    return Window(batch_id, [r.id for r in rows], size, batch.priority)


def top_up(
    session: Session, batch_ids: Iterable[str], *, window: int, lease: float
) -> list[Window]:
    """After a claim took some of these batches' windowed jobs: each one's window brought back
    to its size from its backlog, in whole messages (a window a few jobs short waits for the
    next claim rather than send a small message). A paused or cancelled batch gets none."""
    conn = session.connection()
    now = utcnow()
    out: list[Window] = []
    for batch_id in sorted(set(batch_ids)):
        batch = _batch(conn, batch_id)
        if batch.paused_at is not None or batch.cancelled_at is not None:
            continue
        size = message_size(batch.message_size)
        held = conn.scalar(
            select(func.count())
            .select_from(JOBS)
            .where(*_queued(batch_id), JOBS.c.lease_until.is_not(None))
        )
        short = window_jobs(size, batch.share, window) - int(held or 0)
        if short < size:
            continue
        rows = _from_backlog(conn, batch_id, short - short % size, lease=lease, now=now)
        if rows:
            out.append(Window(batch_id, [r.id for r in rows], size, batch.priority))
    return out


def stalled(session: Session, *, window: int, lease: float, limit: int = 100) -> list[Window]:
    """The windows of batches gone quiet, to send again: every job in the batch's window has
    had its lease run out, none was leased since (a claim of one of its messages would have
    topped the window up with fresh leases). Their messages were lost (a producer killed
    between its commit and its send, a worker between its claim and its send) or have waited
    longer than the lease behind other work; either way the window is sent again and leased
    anew (a duplicate claims nothing), so a quiet batch costs at most one window per lease
    and never waits for the queue to empty. In a batch that is moving, the jobs of a message
    a dead worker took and never claimed are sent again (``_passed_by``). A batch whose
    window emptied without a claim topping it up, its backlog left with no message, gets its
    window opened again (``_drained``). Paused and cancelled batches are left alone."""
    now = utcnow()
    conn = session.connection()
    candidates = (
        conn.execute(
            select(JOBS.c.batch_id)
            .where(
                JOBS.c.status == JobStatus.queued,
                JOBS.c.lease_until < now,
                JOBS.c.batch_id.not_in(
                    select(BATCHES.c.id).where(
                        or_(BATCHES.c.paused_at.is_not(None), BATCHES.c.cancelled_at.is_not(None))
                    )
                ),
            )
            .distinct()
            .limit(limit)
        )
        .scalars()
        .all()
    )
    out: list[Window] = []
    for batch_id in _drained(conn, set(candidates), limit):
        # A backlog and no window: every job that had a message ended without a claim of its
        # message topping the window up (a job the reconciler took back from a worker that
        # then finished it itself counted as held when a claim last looked). Opened again.
        sent = open_window(session, batch_id, window=window, lease=lease)
        if sent.job_ids:
            out.append(sent)
    for batch_id in candidates:
        fresh = conn.scalar(
            select(JOBS.c.id).where(*_queued(batch_id), JOBS.c.lease_until >= now).limit(1)
        )
        sent = (
            open_window(session, batch_id, window=window, lease=lease)
            if fresh is None
            else _passed_by(conn, batch_id, lease=lease, now=now)
        )
        if sent.job_ids:
            out.append(sent)
    return out


def _drained(conn: Connection, skip: set[str], limit: int) -> list[str]:
    """Batches (not paused or cancelled, not in ``skip``) with queued jobs, none of which has a
    message: found through the tallies (``pixelmill.db.tallies``) and one probe of the window
    index each, so a pass costs by the batches with queued jobs, not by their jobs."""
    with_queued = conn.execute(
        select(JobTally.batch_id)
        .join(BATCHES, BATCHES.c.id == JobTally.batch_id)
        .where(
            JobTally.status == JobStatus.queued.value,
            BATCHES.c.paused_at.is_(None),
            BATCHES.c.cancelled_at.is_(None),
        )
        .group_by(JobTally.batch_id)
        .having(func.sum(JobTally.n) > 0)
    ).scalars()
    out = []
    for batch_id in with_queued:
        if batch_id in skip:
            continue
        leased = conn.scalar(
            select(JOBS.c.id).where(*_queued(batch_id), JOBS.c.lease_until.is_not(None)).limit(1)
        )
        if leased is None:
            out.append(batch_id)
            if len(out) >= limit:
                break
    return out


def _passed_by(conn: Connection, batch_id: str, *, lease: float, now: datetime) -> Window:
    """The batch's window jobs whose lease ran out while a job after them (by seq) started:
    a batch's messages go out in seq order and are taken first in, first out, so theirs was
    taken (by a worker that died holding it unclaimed: SIGKILL, a lost host) or lost. Leased
    again, to send again (a duplicate claims nothing)."""
    started = [
        conn.scalar(
            select(func.max(JOBS.c.seq)).where(
                JOBS.c.batch_id == batch_id, JOBS.c.status == status, *lease_until
            )
        )
        for status, lease_until in (
            (JobStatus.done, [JOBS.c.lease_until.is_(None)]),  # the index's last entry
            (JobStatus.failed, [JOBS.c.lease_until.is_(None)]),
            (JobStatus.running, []),  # a few
        )
    ]
    last = max((seq for seq in started if seq is not None), default=None)
    batch = _batch(conn, batch_id)
    size = message_size(batch.message_size)
    if last is None:
        return Window(batch_id, [], size, batch.priority)
    rows = conn.execute(
        update(JOBS)
        .where(*_queued(batch_id), JOBS.c.lease_until < now, JOBS.c.seq < last)
        .values(lease_until=now + timedelta(seconds=lease))
        .returning(JOBS.c.id, JOBS.c.seq)
    ).all()
    return Window(batch_id, [r.id for r in sorted(rows, key=lambda r: r.seq)], size, batch.priority)


def _batch(conn: Connection, batch_id: str) -> Any:
    return conn.execute(
        select(
            BATCHES.c.message_size,
            BATCHES.c.priority,
            BATCHES.c.share,
            BATCHES.c.paused_at,
            BATCHES.c.cancelled_at,
        ).where(BATCHES.c.id == batch_id)
    ).one()


def _queued(batch_id: str) -> tuple[Any, ...]:
    return (JOBS.c.batch_id == batch_id, JOBS.c.status == JobStatus.queued)


def _from_backlog(
    conn: Connection, batch_id: str, count: int, *, lease: float, now: datetime
) -> list[Any]:
    """Move the batch's first ``count`` backlog jobs (by seq) into its window. On PostgreSQL
    two workers topping up the same batch at once take different jobs (SKIP LOCKED); on
    SQLite writers take turns."""
    ids = (
        conn.execute(
            select(JOBS.c.id)
            .where(*_queued(batch_id), JOBS.c.lease_until.is_(None))
            .order_by(JOBS.c.seq)
            .limit(count)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    if not ids:
        return []
    return list(
        conn.execute(
            update(JOBS)
            .where(JOBS.c.id.in_(ids), STILL_QUEUED, JOBS.c.lease_until.is_(None))
            .values(lease_until=now + timedelta(seconds=lease))
            .returning(JOBS.c.id, JOBS.c.seq)
        ).all()
    )
