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
    for status, n in session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    ):
        counts.by_status[JobStatus(status).value] = n
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
                       total=batch.total, created_at=_utc(batch.created_at))  # fmt: skip


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
    """Every job of a batch in submission order, with its result, a page at a time."""
    batch = get_batch(session, batch_id)
    last = -1
    while True:
        rows = session.execute(
            select(Job, Result, Artifact)
            .outerjoin(Result, Result.job_id == Job.id)
            .outerjoin(Artifact, (Artifact.job_id == Job.id) & (Artifact.index == 0))
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
                device=job.device,
                artifact=_artifact_record(artifact) if artifact is not None else None,
                attempts=job.attempts,
            )
            last = job.seq


def _artifact_record(a: Artifact) -> ArtifactRecord:
    return ArtifactRecord(**{f.name: getattr(a, f.name) for f in fields(ArtifactRecord)})
