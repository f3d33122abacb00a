"""The reads: a batch, its counts per state, its failures and its jobs, as the records of
``pixelmill.db.records``. Each takes a Session and changes nothing; the state changes are in
``pixelmill.db.jobs``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, func, select, text
from sqlalchemy.orm import Session

from pixelmill.db.records import ArtifactRecord, BatchCounts, JobResult
from pixelmill.db.schema import Artifact, Batch, Job, JobStatus, Result
from pixelmill.errors import UnknownBatch


def batch_by_fingerprint(session: Session, fingerprint: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.fingerprint == fingerprint))


def unfinished_batch(session: Session, source_key: str) -> Batch | None:
    """The newest batch with ``source_key`` that still has a queued or running job (and was
    not cancelled: its running jobs finish, but it takes on nothing)."""
    open_jobs = (
        select(Job.id)
        .where(Job.batch_id == Batch.id, Job.status.in_((JobStatus.queued, JobStatus.running)))
        .exists()
    )
    return session.scalar(
        select(Batch)
        .where(Batch.source_key == source_key, Batch.cancelled_at.is_(None), open_jobs)
        .order_by(Batch.created_at.desc())
        .limit(1)
    )


def has_other_revision(session: Session, batch_id: str, revision: str) -> bool:
    """Whether some result of the batch (its own or reused) came from another model revision
    than ``revision``: the batch is stale, and the same submit must not return it."""
    source = func.coalesce(Job.reused_from, Job.id)
    found = session.scalar(
        select(Result.job_id)
        .join(Job, Result.job_id == source)
        .where(Job.batch_id == batch_id, Result.model_revision.is_distinct_from(revision))
        .limit(1)
    )
    return found is not None


def queued_job_ids(session: Session, batch_id: str) -> list[str]:
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.batch_id == batch_id, Job.status == JobStatus.queued)
            .order_by(Job.seq)
        )
    )


def get_batch(session: Session, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise UnknownBatch(f"no batch with id {batch_id!r} in this database")
    return batch


def batch_counts(session: Session, batch_id: str) -> BatchCounts:
    batch = get_batch(session, batch_id)
    counts = _counts(batch)
    reused = Job.reused_from.is_not(None)
    for status, was_reused, n in session.execute(
        select(Job.status, reused, func.count())
        .where(Job.batch_id == batch_id)
        .group_by(Job.status, reused)
    ):
        value = JobStatus(status).value
        counts.by_status[value] = counts.by_status.get(value, 0) + n
        if was_reused:
            counts.reused += n
    started, last = session.execute(
        select(func.min(Job.started_at), func.max(Job.finished_at)).where(
            Job.batch_id == batch_id, Job.reused_from.is_(None)
        )
    ).one()
    counts.started_at, counts.last_finished_at = _utc(started), _utc(last)
    return counts


def recent_batches(session: Session, limit: int = 20) -> list[BatchCounts]:
    """The ``limit`` newest batches, newest first, each with its counts per state."""
    batches = session.scalars(
        select(Batch).order_by(Batch.created_at.desc(), Batch.id).limit(limit)
    ).all()
    counts = {b.id: _counts(b) for b in batches}
    if counts:
        for batch_id, status, n in session.execute(
            select(Job.batch_id, Job.status, func.count())
            .where(Job.batch_id.in_(counts))
            .group_by(Job.batch_id, Job.status)
        ):
            counts[batch_id].by_status[JobStatus(status).value] = n
    return list(counts.values())


def _counts(batch: Batch) -> BatchCounts:
    return BatchCounts(batch_id=batch.id, task=batch.task, model=batch.model, name=batch.name,
                       total=batch.total, created_at=_utc(batch.created_at),
                       plan=batch.plan, priority=batch.priority or "normal",
                       paused=batch.paused_at is not None,
                       cancelled=batch.cancelled_at is not None)  # fmt: skip


def _utc(value: datetime | None) -> datetime | None:
    """SQLite keeps no zone; what pixelmill writes there is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def last_finished_at(session: Session, batch_id: str) -> datetime | None:
    """When the batch's last job finished (UTC), as the workers recorded it."""
    return _utc(session.scalar(select(func.max(Job.finished_at)).where(Job.batch_id == batch_id)))


def failure_reasons(session: Session, batch_id: str, limit: int = 20) -> list[tuple[str, int]]:
    rows = session.execute(
        select(Job.error, func.count())
        .where(Job.batch_id == batch_id, Job.status == JobStatus.failed)
        .group_by(Job.error)
        .order_by(func.count().desc())
        .limit(limit)
    ).all()
    return [(r[0] or "", r[1]) for r in rows]


def iter_batch_jobs(session: Session, batch_id: str, page: int = 1000) -> Iterator[JobResult]:
    """Every job of a batch in submission order, with its result, a page at a time (as plain
    columns: no ORM objects, about twice as fast, for exports of millions of jobs). A reused
    job shows the result (and artifact) of the job that computed it."""
    get_batch(session, batch_id)
    last = -1
    while True:
        rows = session.execute(
            _job_results()
            .where(Job.batch_id == batch_id, Job.seq > last)
            .order_by(Job.seq)
            .limit(page)
        ).all()
        if not rows:
            return
        for row in rows:
            yield _job_result(row)
        last = rows[-1].seq


def iter_latest_jobs(
    session: Session,
    prefix: str,
    *,
    task: str | None = None,
    model: str | None = None,
    page: int = 1000,
) -> Iterator[JobResult]:
    """The current result of every input under ``prefix`` (a folder or an object-store prefix
    ending in "/"), across all batches: per (input, task, model) the finished (done or failed)
    job that finished last (ties: the one created last, then the highest id). Sorted by input
    (code point order), then task and model; streamed (``page`` rows at a time).

    The inputs are selected by a range on the indexed ``input`` column, ``prefix <= input <
    prefix with its last character incremented`` (no LIKE: a ``%`` or ``_`` in a name is just
    a character). That range is exact in code point order: SQLite's, and PostgreSQL's in a "C"
    database; in any other collation it is compared as "C" (exact, though the plain index on
    ``input`` cannot serve it then). Ranked in the database, so only the winners' results
    travel. A reused job shows the result of the job that computed it."""
    if not prefix:
        raise ValueError("an empty prefix (use '/' for every path)")
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    column = Job.input if _code_point_order(session) else Job.input.collate("C")
    wanted = [column >= prefix, column < upper, Job.status.in_((JobStatus.done, JobStatus.failed))]
    if task is not None:
        wanted.append(Batch.task == task)
    if model is not None:
        wanted.append(Batch.model == model)
    newest_first = func.row_number().over(
        partition_by=(Job.input, Batch.task, Batch.model),
        order_by=(Job.finished_at.desc(), Job.created_at.desc(), Job.id.desc()),
    )
    ranked = (
        select(Job.id.label("job_id"), newest_first.label("place"))
        .join(Batch, Batch.id == Job.batch_id)
        .where(*wanted)
        .subquery()
    )
    rows = session.execute(
        _job_results()
        .join(ranked, ranked.c.job_id == Job.id)
        .where(ranked.c.place == 1)
        .order_by(column, Batch.task, Batch.model)
        .execution_options(yield_per=page)
    )
    for row in rows:
        if row.input.startswith(prefix):  # the range is exact; this only makes sure of it
            yield _job_result(row)


def _job_results() -> Any:  # a Select, whose type parameters SQLAlchemy 2.0 and 2.1 spell apart
    """Jobs with their batch's task and model, and the result and first artifact of the job
    that computed it (a reused job's: the earlier job's), as plain columns for ``_job_result``."""
    source = func.coalesce(Job.reused_from, Job.id)
    return (
        select(
            Job.id,
            Job.seq,
            Job.input,
            Job.status,
            Job.error,
            Job.device,
            Job.attempts,
            Job.content_sha256,
            Job.reused_from,
            Job.finished_at,
            Job.batch_id,
            Batch.task,
            Batch.model,
            Result.data.label("result"),
            Result.model.label("result_model"),
            Result.model_revision,
            Result.device.label("result_device"),
            *(
                getattr(Artifact, f.name).label(f"artifact_{f.name}")
                for f in fields(ArtifactRecord)
            ),
        )
        .join(Batch, Batch.id == Job.batch_id)
        .outerjoin(Result, Result.job_id == source)
        .outerjoin(Artifact, (Artifact.job_id == source) & (Artifact.index == 0))
    )


def _job_result(r: Row[Any]) -> JobResult:
    """A row of ``_job_results`` as a JobResult."""
    found = r.result_model is not None  # results.model is NOT NULL: a result row was found
    artifact = None
    if r.artifact_key is not None:
        artifact = ArtifactRecord(
            **{f.name: getattr(r, f"artifact_{f.name}") for f in fields(ArtifactRecord)}
        )
    return JobResult(
        job=r.id,
        input=r.input,
        task=r.task,
        status=JobStatus(r.status).value,
        result=r.result if found else None,
        error=r.error,
        model=r.result_model if found else r.model,
        device=r.result_device if found and r.reused_from else r.device,
        artifact=artifact,
        attempts=r.attempts,
        content_sha256=r.content_sha256,
        reused_from=r.reused_from,
        model_revision=r.model_revision if found else None,
        finished_at=_utc(r.finished_at),
        batch_id=r.batch_id,
    )


def _code_point_order(session: Session) -> bool:
    """Whether comparing text in this database is comparing code points (what a prefix range
    needs): SQLite's BINARY collation is; PostgreSQL's is in a database whose collation is C or
    POSIX (C.UTF-8 too) from libc, not in en_US.UTF-8 (punctuation ignored at first) or ICU
    (case compared last)."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return True
    if dialect != "postgresql":
        return False
    collate, provider = session.execute(
        text(
            "SELECT datcollate, to_jsonb(d) ->> 'datlocprovider' FROM pg_database d "
            "WHERE datname = current_database()"
        )
    ).one()
    c_like = collate in ("C", "POSIX") or collate.lower() in ("c.utf8", "c.utf-8")
    return c_like and provider in (None, "c")
