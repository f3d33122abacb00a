"""The few functions that change job state. Each takes a Session and leaves commit to the caller,
except where noted; the worker writes one batch's outcomes in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pixelmill.db.schema import Artifact, Batch, Job, JobStatus, Result, utcnow
from pixelmill.errors import UnknownBatch

INSERT_CHUNK = 2000


@dataclass(frozen=True)
class NewBatch:
    batch_id: str
    job_ids: list[str]


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run one job."""

    job_id: str
    batch_id: str
    input: str
    params: dict[str, Any]
    task: str
    model: str
    options: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class ArtifactRecord:
    """A stored object a job produced, with its provenance. Stored before it is recorded."""

    key: str
    uri: str
    content_type: str
    size: int
    sha256: str
    index: int = 0
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    precision: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One job's end: a result, or an error. Exactly one of the two is set."""

    job_id: str
    result: dict[str, Any] | None = None
    error: str | None = None
    model: str = ""
    model_revision: str | None = None
    device: str = "cpu"
    artifacts: tuple[ArtifactRecord, ...] = ()


@dataclass(frozen=True)
class JobRow:
    job_id: str
    seq: int
    input: str
    task: str
    status: JobStatus
    result: dict[str, Any] | None
    error: str | None
    model: str
    device: str | None
    attempts: int
    artifact: ArtifactRecord | None = None


@dataclass
class BatchCounts:
    batch_id: str
    task: str
    model: str
    name: str | None
    total: int
    by_status: dict[str, int] = field(default_factory=dict)
    created_at: datetime | None = None  # UTC

    @property
    def finished(self) -> int:
        return self.by_status.get("done", 0) + self.by_status.get("failed", 0)

    @property
    def complete(self) -> bool:
        return self.finished >= self.total


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
) -> NewBatch:
    """Register a batch and one queued job per input (with its ``params``, if given).
    The caller commits, then enqueues."""
    if params is not None and len(params) != len(inputs):
        raise ValueError(f"{len(params)} params for {len(inputs)} inputs")
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
        )
    )
    session.flush()
    job_ids = [new_id() for _ in inputs]
    now = utcnow()
    lease_until = now + timedelta(seconds=queued_lease)
    for start in range(0, len(inputs), INSERT_CHUNK):
        rows = [
            {
                "id": job_ids[i],
                "batch_id": batch_id,
                "seq": i,
                "input": inputs[i],
                "params": params[i] if params is not None else None,
                "status": JobStatus.queued,
                "attempts": 0,
                "created_at": now,
                "lease_until": lease_until,
            }
            for i in range(start, min(start + INSERT_CHUNK, len(inputs)))
        ]
        session.execute(insert(Job), rows)
    return NewBatch(batch_id=batch_id, job_ids=job_ids)


# "Not finished yet", written so that no index can serve it: on SQLite, `status IN (queued,
# running)` beside `id IN (...)` made the planner walk the (status, lease_until) index over
# every open job, once per message (quadratic in the batch's size); `NOT IN` leaves it the
# primary key. A job's status is never NULL, so the two say the same.
FINISHED = (JobStatus.done, JobStatus.failed)
GAVE_UP = "gave up after"
JOBS = cast(Table, Job.__table__)
UNFINISHED = JOBS.c.status.not_in(FINISHED)


@dataclass(frozen=True)
class BatchInfo:
    """A batch's task, model and options: fixed once the batch exists, so a worker may keep
    them (``claim_jobs(batches=...)``) instead of reading them for every message."""

    task: str
    model: str
    options: dict[str, Any]


def claim_jobs(
    session: Session,
    job_ids: Sequence[str],
    *,
    worker: str,
    device: str,
    lease: float = 300,
    max_attempts: int | None = None,
    batches: dict[str, BatchInfo] | None = None,
) -> list[ClaimedJob]:
    """Mark the still-unfinished jobs among ``job_ids`` running (leased to ``worker`` for
    ``lease`` seconds) and return them, in order, each with its attempts counting this one.

    Jobs already done or failed are left alone and not returned: a redelivered message
    changes nothing. A job already started ``max_attempts`` times without finishing (each
    time its worker died) is failed instead, with that reason. One UPDATE .. RETURNING in the
    common case; ``batches`` caches the batches' task, model and options between calls.
    """
    if not job_ids:
        return []
    conn = session.connection()
    now = utcnow()
    wanted: list[ColumnElement[bool]] = [JOBS.c.id.in_(job_ids), UNFINISHED]
    if max_attempts is not None:
        wanted.append(JOBS.c.attempts < max_attempts)
    rows = conn.execute(
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
        .returning(JOBS.c.id, JOBS.c.batch_id, JOBS.c.input, JOBS.c.params, JOBS.c.attempts)
    ).all()
    left = set(job_ids).difference(r.id for r in rows)
    if max_attempts is not None and left:  # finished already, or out of attempts
        conn.execute(
            update(JOBS)
            .where(JOBS.c.id.in_(left), UNFINISHED, JOBS.c.attempts >= max_attempts)
            .values(
                status=JobStatus.failed,
                error=f"{GAVE_UP} {max_attempts} attempts: the worker processing this input "
                "stopped (crashed or was killed) each time",
                finished_at=now,
                lease_until=None,
            )
        )
    # Looked up one key at a time into a dict of this call's own: the cache may be shared by
    # a worker's threads, and cleared by one of them.
    cache = batches if batches is not None else {}
    known = {bid: info for bid in {r.batch_id for r in rows} if (info := cache.get(bid))}
    missing = {r.batch_id for r in rows if r.batch_id not in known}
    if missing:
        for b in conn.execute(
            select(Batch.id, Batch.task, Batch.model, Batch.options).where(Batch.id.in_(missing))
        ):
            known[b.id] = cache[b.id] = BatchInfo(b.task, b.model, dict(b.options or {}))
    by_id = {
        r.id: ClaimedJob(
            job_id=r.id,
            batch_id=r.batch_id,
            input=r.input,
            params=dict(r.params or {}),
            task=known[r.batch_id].task,
            model=known[r.batch_id].model,
            options=dict(known[r.batch_id].options),
            attempts=r.attempts,
        )
        for r in rows
    }
    return [by_id[j] for j in job_ids if j in by_id]


def write_outcomes(session: Session, outcomes: Sequence[Outcome]) -> None:
    """Record a batch of outcomes: job states (forward only), results and artifacts.

    Each job's state moves with an UPDATE .. WHERE status is still open .. RETURNING: jobs
    already done or failed (a redelivered message, a slower duplicate) are left exactly as
    they are and their outcome here is dropped. The UPDATE locks the rows on PostgreSQL, so
    two workers racing on the same jobs serialise and the second finds them finished.
    """
    if not outcomes:
        return
    conn = session.connection()
    now = utcnow()
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
    results = [o for o in outcomes if o.job_id in moved and o.result is not None and not o.error]
    if results:
        _upsert(
            session,
            Result,
            [
                {
                    "job_id": o.job_id,
                    "data": o.result,
                    "model": o.model,
                    "model_revision": o.model_revision,
                    "device": o.device,
                    "created_at": now,
                }
                for o in results
            ],
            key=Result.job_id,
        )
    artifacts = [
        {
            "job_id": o.job_id,
            "model": o.model,
            "model_revision": o.model_revision,
            "device": o.device,
            "created_at": now,
            **asdict(a),
        }
        for o in results
        for a in o.artifacts
    ]
    if artifacts:
        _upsert(session, Artifact, artifacts, key=Artifact.key)


def requeue_failed(session: Session, batch_id: str, *, queued_lease: float = 600) -> list[str]:
    """A user's retry: the batch's failed jobs go back to queued, with their attempts reset
    (the one move back a job's state makes, and only on request). Returns their ids, in order;
    the caller commits, then enqueues them."""
    get_batch(session, batch_id)
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
                lease_until=utcnow() + timedelta(seconds=queued_lease),
            )
            .returning(JOBS.c.id, JOBS.c.seq)
        )
        .all()
    )
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
        if worker is not None:
            wanted.append(JOBS.c.worker == worker)
        moved.extend(
            conn.execute(update(JOBS).where(*wanted).values(**values).returning(JOBS.c.id))
            .scalars()
            .all()
        )
    return moved


@dataclass(frozen=True)
class Stranded:
    """Jobs of one batch whose lease ran out, to enqueue again; ``options`` are the batch's
    (its message size is the queue's business: ``pixelmill.wire.message_size``)."""

    batch_id: str
    job_ids: list[str]
    options: dict[str, Any] | None


def take_stranded(
    session: Session, *, status: JobStatus, lease: float, limit: int = 10000
) -> list[Stranded]:
    """Jobs in ``status`` whose lease has run out: their message was lost (queued) or their
    worker died (running). Each is leased again for ``lease`` seconds by the same UPDATE, so
    two reconcilers never take the same job twice."""
    now = utcnow()
    conn = session.connection()
    ids = (
        conn.execute(
            select(JOBS.c.id)
            .where(JOBS.c.status == status, JOBS.c.lease_until < now)
            .order_by(JOBS.c.lease_until)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    if not ids:
        return []
    rows = conn.execute(
        update(JOBS)
        .where(JOBS.c.id.in_(ids), JOBS.c.status == status, JOBS.c.lease_until < now)
        .values(lease_until=now + timedelta(seconds=lease))
        .returning(JOBS.c.id, JOBS.c.batch_id, JOBS.c.seq)
    ).all()
    options: dict[str, Any] = dict(
        conn.execute(
            select(Batch.id, Batch.options).where(Batch.id.in_({r.batch_id for r in rows}))
        ).all()
    )
    by_batch: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        by_batch.setdefault(r.batch_id, []).append((r.seq, r.id))
    return [
        Stranded(
            batch_id=batch_id,
            job_ids=[job_id for _, job_id in sorted(jobs)],
            options=options.get(batch_id),
        )
        for batch_id, jobs in by_batch.items()
    ]


def _upsert(session: Session, table: Any, rows: list[dict[str, Any]], *, key: Any) -> None:
    """INSERT .. ON CONFLICT (key) DO UPDATE, on PostgreSQL and SQLite alike: a redelivered
    batch rewrites the same rows instead of adding new ones."""
    dialect = session.get_bind().dialect.name
    if dialect not in ("postgresql", "sqlite"):  # pragma: no cover - settings refuse others
        raise NotImplementedError(dialect)
    insert_for = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt: Any = insert_for(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[key],
        set_={c: stmt.excluded[c] for c in rows[0] if c not in (key.key, "created_at")},
    )
    # executemany with one cached statement (a multi-row VALUES would be compiled each time).
    session.connection().execute(stmt, rows)


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


def iter_batch_jobs(session: Session, batch_id: str, page: int = 1000) -> Iterator[JobRow]:
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
            yield JobRow(
                job_id=job.id,
                seq=job.seq,
                input=job.input,
                task=batch.task,
                status=JobStatus(job.status),
                result=result.data if result is not None else None,
                error=job.error,
                model=result.model if result is not None else batch.model,
                device=job.device,
                attempts=job.attempts,
                artifact=_artifact_record(artifact) if artifact is not None else None,
            )
            last = job.seq


def _artifact_record(a: Artifact) -> ArtifactRecord:
    return ArtifactRecord(**{f.name: getattr(a, f.name) for f in fields(ArtifactRecord)})
