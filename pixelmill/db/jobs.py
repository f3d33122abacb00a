"""The few functions that change job state. Each takes a Session and leaves commit to the caller,
except where noted; the worker writes one batch's outcomes in one transaction. The records they
take and return are in ``pixelmill.db.records``, the reads in ``pixelmill.db.reads``."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Table,
    and_,
    bindparam,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from pixelmill.db.content_index import FILES, index_results
from pixelmill.db.control import CANCELLED
from pixelmill.db.metric_totals import Total, add_totals, count_outcomes
from pixelmill.db.reads import get_batch
from pixelmill.db.records import (
    ArtifactRecord,
    BatchInfo,
    ClaimedJob,
    ContentSeen,
    NewBatch,
    Outcome,
    Stranded,
)
from pixelmill.db.schema import TERMINAL, Artifact, Batch, Job, JobStatus, Result, utcnow
from pixelmill.db.tallies import count_new
from pixelmill.db.upsert import upsert
from pixelmill.db.window import open_window
from pixelmill.errors import InputError

INSERT_CHUNK = 2000

# "Not finished yet", written so that no index can serve it: on SQLite, `status IN (queued,
# running)` beside `id IN (...)` made the planner walk the (status, lease_until) index over
# every open job, once per message (quadratic in the batch's size); `NOT IN` leaves it the
# primary key. A job's status is never NULL, so the two say the same.
FINISHED = TERMINAL
GAVE_UP = "gave up after"
JOBS = cast(Table, Job.__table__)
BATCHES = cast(Table, Batch.__table__)
RESULTS = cast(Table, Result.__table__)
ARTIFACTS = cast(Table, Artifact.__table__)
UNFINISHED = JOBS.c.status.not_in(FINISHED)


def claimable(now: datetime) -> ColumnElement[bool]:
    """A job a worker may start: queued, or running with its lease run out (its holder died
    or stalled; the reconciler puts such a job back in the queue too), and not of a paused or
    cancelled batch. A running job whose holder is alive is never taken by a second worker, so
    a duplicate message (a resume, a reprioritise, a redelivery) changes nothing."""
    return and_(
        UNFINISHED,
        or_(
            JOBS.c.status != JobStatus.running,
            JOBS.c.lease_until < now,
            JOBS.c.lease_until.is_(None),
        ),
        JOBS.c.batch_id.not_in(HELD_BACK),
    )


# Batches whose jobs no worker may start: paused (until resumed) or cancelled (for good: the
# reconciler cancels a stranded job of theirs instead of enqueueing it again).
HELD_BACK = select(BATCHES.c.id).where(
    or_(BATCHES.c.paused_at.is_not(None), BATCHES.c.cancelled_at.is_not(None))
)
CANCELLED_BATCHES = select(BATCHES.c.id).where(BATCHES.c.cancelled_at.is_not(None))


def new_id() -> str:
    return str(uuid.uuid4())


def create_batch(
    session: Session,
    *,
    task: str,
    model: str,
    inputs: Sequence[str],
    options: dict[str, Any] | None = None,
    name: str | None = None,
    params: Sequence[dict[str, Any] | None] | None = None,
    queued_lease: float = 600,
    fingerprint: str | None = None,
    contents: Sequence[str | None] | None = None,
    reused: Mapping[int, str] | None = None,
    recipe: str | None = None,
    source_key: str | None = None,
    plan: dict[str, int] | None = None,
    priority: str = "normal",
    message_size: int | None = None,
    share: int = 1,
    window: int | None = None,
) -> NewBatch:
    """Register a batch and one job per input (with its ``params``, if given, and the sha256
    of its bytes in ``contents``). The jobs are queued, except those ``reused`` maps (by
    position) to the earlier job whose result they take: they are done at once. Returns the
    ids of the queued jobs to enqueue: with ``window`` (messages, ``pixelmill.db.window``) only
    the batch's first window, the rest waiting in its backlog; without, all of them. The
    caller commits, then enqueues them."""
    if share < 1:
        raise InputError(f"share must be 1 or more, not {share}")
    for what, given in (("params", params), ("contents", contents)):
        if given is not None and len(given) != len(inputs):
            raise ValueError(f"{len(given)} {what} for {len(inputs)} inputs")
    reused = reused or {}
    batch_id = new_id()
    session.add(
        Batch(
            id=batch_id,
            name=name,
            task=task,
            model=model,
            options=options or {},
            total=len(inputs),
            created_at=utcnow(),
            fingerprint=fingerprint,
            recipe=recipe,
            source_key=source_key,
            plan=plan,
            priority=priority,
            message_size=message_size,
            share=share,
        )
    )
    session.flush()
    job_ids = [new_id() for _ in inputs]
    now = utcnow()
    lease_until = None if window is not None else now + timedelta(seconds=queued_lease)
    for start in range(0, len(inputs), INSERT_CHUNK):
        rows = [
            {
                "id": job_ids[i],
                "batch_id": batch_id,
                "seq": i,
                "input": inputs[i],
                "params": params[i] if params is not None else None,
                "content_sha256": contents[i] if contents is not None else None,
                "reused_from": reused.get(i),
                "status": JobStatus.done if i in reused else JobStatus.queued,
                "attempts": 0,
                "created_at": now,
                "finished_at": now if i in reused else None,
                "lease_until": None if i in reused else lease_until,
            }
            for i in range(start, min(start + INSERT_CHUNK, len(inputs)))
        ]
        session.connection().execute(insert(JOBS), rows)  # Core: no ORM bulk bookkeeping
    queued = [job_id for i, job_id in enumerate(job_ids) if i not in reused]
    count_new(session, batch_id, queued=len(queued), reused=len(inputs) - len(queued))
    if window is None:
        return NewBatch(batch_id=batch_id, job_ids=queued, queued=len(queued))
    first = open_window(session, batch_id, window=window, lease=queued_lease)
    return NewBatch(batch_id=batch_id, job_ids=first.job_ids, queued=len(queued))


def refresh_statistics(session: Session) -> None:
    """PostgreSQL: ``ANALYZE jobs``, after a bulk registration (a sample: about a second at a
    few million jobs). SQLite's planner needs none for pixelmill's queries."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE jobs"))


def retire_fingerprint(session: Session, batch_id: str) -> None:
    """The batch is stale (a newer model revision): the same submit no longer finds it."""
    session.execute(update(Batch).where(Batch.id == batch_id).values(fingerprint=None))


def claim_jobs(
    session: Session,
    job_ids: Sequence[str],
    *,
    worker: str,
    device: str,
    lease: float = 300,
    max_attempts: int | None = None,
    known: Mapping[str, BatchInfo] | None = None,
) -> list[ClaimedJob]:
    """Mark the still-unfinished jobs among ``job_ids`` running (leased to ``worker`` for
    ``lease`` seconds) and return them, in order, each with its attempts counting this one.

    Only ``claimable`` jobs are taken: those finished, held by a live worker, or of a paused
    batch are left alone and not returned, so a redelivered message changes nothing. A job
    already started ``max_attempts`` times without finishing (each time its worker died) is
    failed instead, with that reason. One UPDATE .. RETURNING in the
    common case; the batches' task, model and options come from ``known`` (the caller's own
    cache, only read here) or, for a batch not in it, from the database.
    """
    if not job_ids:
        return []
    conn = session.connection()
    now = utcnow()
    rows = _start_jobs(
        conn, job_ids, worker=worker, device=device, lease=lease, max_attempts=max_attempts, now=now
    )
    left = set(job_ids).difference(r.id for r in rows)
    if max_attempts is not None and left:  # finished already, held, or out of attempts
        _give_up(conn, left, max_attempts=max_attempts, now=now)
    infos = _batch_infos(conn, {r.batch_id for r in rows}, known or {})
    by_id = {
        r.id: ClaimedJob(
            job_id=r.id,
            batch_id=r.batch_id,
            input=r.input,
            params=dict(r.params or {}),
            batch=infos[r.batch_id],
            attempts=r.attempts,
            content_sha256=r.content_sha256,
        )
        for r in rows
    }
    return [by_id[j] for j in job_ids if j in by_id]


def _start_jobs(
    conn: Connection,
    job_ids: Sequence[str],
    *,
    worker: str,
    device: str,
    lease: float,
    max_attempts: int | None,
    now: datetime,
) -> Sequence[Row[Any]]:
    """The claim itself: the unfinished jobs among ``job_ids`` (with attempts left) move to
    running, leased to ``worker``, in one UPDATE .. RETURNING."""
    wanted: list[ColumnElement[bool]] = [JOBS.c.id.in_(job_ids), claimable(now)]
    if max_attempts is not None:
        wanted.append(JOBS.c.attempts < max_attempts)
    return conn.execute(
        update(JOBS)
        .where(*wanted)
        .values(
            status=JobStatus.running,
            attempts=JOBS.c.attempts + 1,
            worker=worker,
            device=device,
            started_at=now,
            lease_until=now + timedelta(seconds=lease),
        )
        .returning(
            JOBS.c.id,
            JOBS.c.batch_id,
            JOBS.c.input,
            JOBS.c.params,
            JOBS.c.attempts,
            JOBS.c.content_sha256,
        )
    ).all()


def _give_up(
    conn: Connection, job_ids: Collection[str], *, max_attempts: int, now: datetime
) -> None:
    """Fail the claimable jobs among ``job_ids`` already started ``max_attempts`` times."""
    failed = (
        conn.execute(
            update(JOBS)
            .where(JOBS.c.id.in_(job_ids), claimable(now), JOBS.c.attempts >= max_attempts)
            .values(
                status=JobStatus.failed,
                error=f"{GAVE_UP} {max_attempts} attempts: the worker processing this input "
                "stopped (crashed or was killed) each time",
                finished_at=now,
                lease_until=None,
            )
            .returning(JOBS.c.id)
        )
        .scalars()
        .all()
    )
    count_outcomes(conn, failed, "failed")


def _batch_infos(
    conn: Connection, batch_ids: set[str], known: Mapping[str, BatchInfo]
) -> dict[str, BatchInfo]:
    """The task, model and options of ``batch_ids``: from ``known`` where it has them, read
    where not. ``known`` is not changed: what to keep is the caller's business."""
    # Looked up one key at a time into a dict of this call's own: ``known`` may be shared by
    # a worker's threads, and cleared by one of them.
    infos = {bid: info for bid in batch_ids if (info := known.get(bid))}
    missing = batch_ids.difference(infos)
    if missing:
        for b in conn.execute(
            select(Batch.id, Batch.task, Batch.model, Batch.options).where(Batch.id.in_(missing))
        ):
            infos[b.id] = BatchInfo(b.task, b.model, dict(b.options or {}))
    return infos


def write_outcomes(
    session: Session, outcomes: Sequence[Outcome], totals: Sequence[Total] = ()
) -> None:
    """Record a batch of outcomes: job states (forward only), results and artifacts.

    Each job's state moves with an UPDATE .. WHERE status is still open .. RETURNING: jobs
    already done or failed (a redelivered message, a slower duplicate) are left exactly as
    they are and their outcome here is dropped. The UPDATE locks the rows on PostgreSQL, so
    two workers racing on the same jobs serialise and the second finds them finished.

    ``totals`` (the message's timings: ``pixelmill.db.metric_totals.histogram``) are added in the
    same transaction, after the items counted by outcome.
    """
    if not outcomes:
        if totals:
            add_totals(session.connection(), totals)
        return
    now = utcnow()
    conn = session.connection()
    moved = _finish_jobs(conn, outcomes, now=now)
    for outcome in ("done", "failed"):
        count_outcomes(
            conn, [o.job_id for o in outcomes if o.job_id in moved and _kind(o) == outcome], outcome
        )
    add_totals(conn, totals)
    results = [o for o in outcomes if o.job_id in moved and o.result is not None and not o.error]
    seen = [(o.job_id, o.content) for o in outcomes if o.job_id in moved and o.content]
    if seen:
        _record_contents(conn, seen)
    if results:
        rows = [_result_row(o, now) for o in results]
        upsert(conn, RESULTS, rows, key=["job_id"], keep=["created_at"])
        by_revision: dict[str | None, list[str]] = {}
        for o in results:
            by_revision.setdefault(o.model_revision, []).append(o.job_id)
        for revision, ids in by_revision.items():
            index_results(conn, ids, revision)
    artifacts = [_artifact_row(o, a, now) for o in results for a in o.artifacts]
    upsert(conn, ARTIFACTS, artifacts, key=["key"], keep=["created_at"])
    embedded = [(o, o.embedding) for o in results if o.embedding is not None]
    if embedded:  # numpy, imported only where embeddings are written (not by `status`)
        from pixelmill.db.embeddings import EmbeddingRow, write_embeddings

        vectors = [EmbeddingRow(o.job_id, o.model, o.model_revision or "", vector)
                   for o, vector in embedded]  # fmt: skip
        write_embeddings(conn, vectors)


def _kind(o: Outcome) -> str:
    return "done" if o.result is not None and o.error is None else "failed"


def _record_contents(conn: Connection, seen: Sequence[tuple[str, ContentSeen]]) -> None:
    """What the worker learnt reading inputs: the sha256 of the bytes each job really processed
    (whatever the producer hashed: the file may have changed since), and each object's
    (size, ETag) -> sha256 for the next run's fast path."""
    conn.execute(
        update(JOBS).where(JOBS.c.id == bindparam("job")).values(content_sha256=bindparam("sha")),
        [{"job": job_id, "sha": content.sha256} for job_id, content in seen],
    )
    now = utcnow()
    stamps = {
        c.uri: {"path": c.uri, "size": c.size, "mtime_ns": 0, "inode": None, "etag": c.etag,
                "sha256": c.sha256, "checked_at": now}
        for _, c in seen
        if c.etag is not None and c.sha256 is not None
    }  # fmt: skip
    upsert(conn, FILES, list(stamps.values()), key=["path"])


def _finish_jobs(conn: Connection, outcomes: Sequence[Outcome], *, now: datetime) -> set[str]:
    """Move the outcomes' still-unfinished jobs to failed (one UPDATE each, with its error)
    and then to done (one UPDATE per device); returns the ids that moved."""
    moved: set[str] = set()
    done_by_device: dict[str, list[str]] = {}
    for o in outcomes:
        if o.result is not None and o.error is None:
            done_by_device.setdefault(o.device, []).append(o.job_id)
            continue
        moved.update(
            conn.execute(
                update(JOBS)
                .where(JOBS.c.id == o.job_id, UNFINISHED)
                .values(
                    status=JobStatus.failed,
                    error=o.error or "unknown error",
                    device=o.device,
                    finished_at=now,
                    lease_until=None,
                )
                .returning(JOBS.c.id)
            ).scalars()
        )
    for device, ids in done_by_device.items():
        moved.update(
            conn.execute(
                update(JOBS)
                .where(JOBS.c.id.in_(ids), UNFINISHED)
                .values(
                    status=JobStatus.done,
                    error=None,
                    device=device,
                    finished_at=now,
                    lease_until=None,
                )
                .returning(JOBS.c.id)
            ).scalars()
        )
    return moved


def _result_row(o: Outcome, now: datetime) -> dict[str, Any]:
    return {
        "job_id": o.job_id,
        "data": o.result,
        "model": o.model,
        "model_revision": o.model_revision,
        "device": o.device,
        "created_at": now,
    }


def _artifact_row(o: Outcome, a: ArtifactRecord, now: datetime) -> dict[str, Any]:
    return {
        "job_id": o.job_id,
        "model": o.model,
        "model_revision": o.model_revision,
        "device": o.device,
        "created_at": now,
        **asdict(a),
    }


def requeue_failed(
    session: Session, batch_id: str, *, queued_lease: float = 600, window: int | None = None
) -> list[str]:
    """A user's retry: the batch's failed jobs go back to queued, with their attempts reset
    (the one move back a job's state makes, and only on request). Returns their ids, in order
    (with ``window``: those of the batch's window, the others wait in its backlog); the caller
    commits, then enqueues them. A cancelled batch is not retried (InputError): its cancelled
    jobs stay cancelled, and a submit of the same inputs makes a new batch."""
    if get_batch(session, batch_id).cancelled_at is not None:
        raise InputError(
            f"batch {batch_id} was cancelled: there is nothing to retry (submit its inputs "
            "again for a new batch)"
        )
    rows = (
        session.connection()
        .execute(
            update(JOBS)
            .where(JOBS.c.batch_id == batch_id, JOBS.c.status == JobStatus.failed)
            .values(
                status=JobStatus.queued,
                attempts=0,
                error=None,
                finished_at=None,
                started_at=None,
                lease_until=None
                if window is not None
                else utcnow() + timedelta(seconds=queued_lease),
            )
            .returning(JOBS.c.id, JOBS.c.seq)
        )
        .all()
    )
    if window is not None:
        return open_window(session, batch_id, window=window, lease=queued_lease).job_ids
    return [r.id for r in sorted(rows, key=lambda r: r.seq)]


def _chunks(ids: Collection[str]) -> Iterator[list[str]]:
    """``ids`` in lists of INSERT_CHUNK, so that no statement holds too many parameters."""
    items = list(ids)
    for start in range(0, len(items), INSERT_CHUNK):
        yield items[start : start + INSERT_CHUNK]


def renew_leases(session: Session, job_ids: Collection[str], *, worker: str, lease: float) -> int:
    """The heartbeat: ``worker`` still holds these running jobs (those of the batches it is
    making progress on) for ``lease`` more seconds. A job another worker took meanwhile, or one
    already finished, is left alone."""
    renewed = 0
    for chunk in _chunks(job_ids):
        result = session.connection().execute(
            update(JOBS)
            .where(
                JOBS.c.id.in_(chunk), JOBS.c.worker == worker, JOBS.c.status == JobStatus.running
            )
            .values(lease_until=utcnow() + timedelta(seconds=lease))
        )
        renewed += int(getattr(result, "rowcount", 0) or 0)
    return renewed


def fail_jobs(
    session: Session,
    job_ids: Collection[str],
    *,
    reason: str,
    worker: str | None = None,
    device: str | None = None,
) -> list[str]:
    """Fail the still-unfinished jobs among ``job_ids`` (with ``worker``: only those it still
    holds) with ``reason``; returns the ids that moved. What a batch does with the jobs it
    claimed when it cannot finish them (an unexpected error, a service away for too long)."""
    moved: list[str] = []
    conn = session.connection()
    values: dict[str, Any] = {
        "status": JobStatus.failed,
        "error": reason,
        "finished_at": utcnow(),
        "lease_until": None,
    }
    if device is not None:
        values["device"] = device
    for chunk in _chunks(job_ids):
        wanted: list[ColumnElement[bool]] = [JOBS.c.id.in_(chunk), UNFINISHED]
        if worker is not None:  # and only while it holds them
            wanted += [JOBS.c.worker == worker, JOBS.c.status == JobStatus.running]
        moved.extend(
            conn.execute(update(JOBS).where(*wanted).values(**values).returning(JOBS.c.id))
            .scalars()
            .all()
        )
    count_outcomes(conn, moved, "failed")
    return moved


def take_stranded(
    session: Session,
    *,
    status: JobStatus,
    lease: float,
    limit: int = 10000,
    expired_before: datetime | None = None,
) -> list[Stranded]:
    """Jobs in ``status`` whose lease has run out, to enqueue again: their message was lost
    (queued) or their worker died (running; such a job goes back to queued, with its attempts,
    for the next claim). Each is leased again for ``lease`` seconds by the same UPDATE, so two
    reconcilers never take the same job twice. Paused batches' jobs wait for their resume;
    cancelled batches' end cancelled. ``expired_before``: take the jobs whose lease ends
    before then instead of now (after the broker lost every message: the jobs not leased
    again since the loss was noticed, whatever their lease)."""
    now = utcnow()
    conn = session.connection()
    due = [JOBS.c.status == status, JOBS.c.lease_until < (expired_before or now)]
    # A cancelled batch's job whose worker died is not run again: it ends cancelled, as does
    # a queued one its cancel left (its caller died between two of its transactions).
    left = [JOBS.c.status == status] if status == JobStatus.queued else due
    conn.execute(
        update(JOBS)
        .where(*left, JOBS.c.batch_id.in_(CANCELLED_BATCHES))
        .values(status=JobStatus.cancelled, error=CANCELLED, finished_at=now, lease_until=None)
    )
    stranded = [*due, JOBS.c.batch_id.not_in(HELD_BACK)]
    ids = (
        conn.execute(select(JOBS.c.id).where(*stranded).order_by(JOBS.c.lease_until).limit(limit))
        .scalars()
        .all()
    )
    if not ids:
        return []
    rows = conn.execute(
        update(JOBS)
        .where(JOBS.c.id.in_(ids), *stranded)
        .values(status=JobStatus.queued, lease_until=now + timedelta(seconds=lease))
        .returning(JOBS.c.id, JOBS.c.batch_id, JOBS.c.seq)
    ).all()
    sizes: dict[str, int | None] = {}
    priorities: dict[str, str] = {}
    for b in conn.execute(
        select(Batch.id, Batch.message_size, Batch.priority).where(
            Batch.id.in_({r.batch_id for r in rows})
        )
    ):
        sizes[b.id], priorities[b.id] = b.message_size, b.priority
    by_batch: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        by_batch.setdefault(r.batch_id, []).append((r.seq, r.id))
    return [
        Stranded(
            batch_id=batch_id,
            job_ids=[job_id for _, job_id in sorted(jobs)],
            message_size=sizes.get(batch_id),
            priority=priorities.get(batch_id) or "normal",
        )
        for batch_id, jobs in by_batch.items()
    ]
