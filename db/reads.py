"""The reads: a batch, its counts per state, its failures and its jobs, as the records of
``pixelmill.db.records``. Each takes a Session and changes nothing; the state changes are in
``pixelmill.db.jobs``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pixelmill.db.records import ArtifactRecord, BatchCounts, JobResult
from pixelmill.db.schema import Artifact, Batch, Job, JobStatus, Result
from pixelmill.errors import UnknownBatch


def batch_by_fingerprint(session: Session, fingerprint: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.fingerprint == fingerprint))


def unfinished_batch(session: Session, source_key: str) -> Batch | None:
    """The newest batch with ``source_key`` that still has a queued or running job."""
    open_jobs = (
        select(Job.id)
        .where(Job.batch_id == Batch.id, Job.status.in_((JobStatus.queued, JobStatus.running)))
        .exists()
    )
    return session.scalar(
        select(Batch)
        .where(Batch.source_key == source_key, open_jobs)
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
                       plan=batch.plan)  # fmt: skip


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
    """Every job of a batch in submission order, with its result, a page at a time. A reused
    job shows the result (and artifact) of the job that computed it."""
    batch = get_batch(session, batch_id)
    source = func.coalesce(Job.reused_from, Job.id)
    last = -1
    while True:
        rows = session.execute(
            select(Job, Result, Artifact)
            .outerjoin(Result, Result.job_id == source)
            .outerjoin(Artifact, (Artifact.job_id == source) & (Artifact.index == 0))
            .where(Job.batch_id == batch_id, Job.seq > last)
            .order_by(Job.seq)
            .limit(page)
        ).all()
        if not rows:
            return
        for job, result, artifact in rows:
            yield JobResult(
                job=job.id,
                input=job.input,
                task=batch.task,
                status=JobStatus(job.status).value,
                result=result.data if result is not None else None,
                error=job.error,
                model=result.model if result is not None else batch.model,
                device=result.device if result is not None and job.reused_from else job.device,
                artifact=_artifact_record(artifact) if artifact is not None else None,
                attempts=job.attempts,
                content_sha256=job.content_sha256,
                reused_from=job.reused_from,
                model_revision=result.model_revision if result is not None else None,
                finished_at=_utc(job.finished_at),
                batch_id=batch_id,
            )
            last = job.seq


def _artifact_record(a: Artifact) -> ArtifactRecord:
    return ArtifactRecord(**{f.name: getattr(a, f.name) for f in fields(ArtifactRecord)})
