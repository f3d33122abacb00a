"""The reads: a batch, its counts per state, its failures and its jobs, as the records of
``pixelmill.db.records``. Each takes a Session and changes nothing; the state changes are in
``pixelmill.db.jobs``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, Row, and_, case, cast, func, select, text
from sqlalchemy.orm import Session

from pixelmill.db.records import (
    ArtifactRecord,
    BatchCounts,
    FailureExample,
    FailureGroup,
    Failures,
    JobResult,
    as_utc,
)
from pixelmill.db.schema import Artifact, Batch, Job, JobStatus, Result
from pixelmill.db.tallies import Tally, tallies, tally
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


def queued_count(session: Session, batch_id: str) -> int:
    """How many of the batch's jobs are queued (in its window or its backlog)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.batch_id == batch_id, Job.status == JobStatus.queued)
        )
        or 0
    )


def get_batch(session: Session, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise UnknownBatch(f"no batch with id {batch_id!r} in this database")
    return batch


def batch_counts(session: Session, batch_id: str) -> BatchCounts:
    """The batch with its counts per state, from the tallies (``pixelmill.db.tallies``): a
    few rows whatever its size."""
    batch = get_batch(session, batch_id)
    counts = _counts(batch)
    _fill(counts, tally(session, batch_id))
    return counts


def recent_batches(session: Session, limit: int = 20) -> list[BatchCounts]:
    """The ``limit`` newest batches, newest first, each with its counts per state."""
    batches = session.scalars(
        select(Batch).order_by(Batch.created_at.desc(), Batch.id).limit(limit)
    ).all()
    counts = {b.id: _counts(b) for b in batches}
    for batch_id, found in tallies(session, counts).items():
        _fill(counts[batch_id], found)
    return list(counts.values())


def _fill(counts: BatchCounts, found: Tally) -> None:
    counts.by_status.update(found.by_status)
    counts.reused = found.reused
    counts.started_at, counts.last_finished_at = found.started_at, found.last_finished_at


def _counts(batch: Batch) -> BatchCounts:
    return BatchCounts(batch_id=batch.id, task=batch.task, model=batch.model, name=batch.name,
                       total=batch.total, created_at=as_utc(batch.created_at),
                       plan=batch.plan, priority=batch.priority or "normal",
                       paused=batch.paused_at is not None,
                       cancelled=batch.cancelled_at is not None)  # fmt: skip


def last_finished_at(session: Session, batch_id: str) -> datetime | None:
    """When the batch's last job finished (UTC), as the workers recorded it (its tally: jobs
    done at submit with an earlier result left out)."""
    return tally(session, batch_id).last_finished_at


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
        finished_at=as_utc(r.finished_at),
        batch_id=r.batch_id,
        seq=r.seq,
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


# ---- the dashboard's reads -------------------------------------------------------------------


def find_batches(
    session: Session,
    limit: int = 50,
    match: str | None = None,
    *,
    only: str | None = None,
) -> list[BatchCounts]:
    """The ``limit`` newest batches whose id, name, task or model contains ``match`` (any
    case; ``%`` and ``_`` are plain characters), or the batch ``only``, newest first, each with
    its counts per state, its reused jobs, and when its first job started and its last
    finished: all from the tallies (``pixelmill.db.tallies``), a few rows per batch whatever
    its size."""
    query = select(Batch).order_by(Batch.created_at.desc(), Batch.id).limit(limit)
    if only is not None:
        query = query.where(Batch.id == only)
    if match:
        needle = match.lower()
        query = query.where(
            func.lower(Batch.id).contains(needle, autoescape=True)
            | func.lower(func.coalesce(Batch.name, "")).contains(needle, autoescape=True)
            | func.lower(Batch.task).contains(needle, autoescape=True)
            | func.lower(Batch.model).contains(needle, autoescape=True)
        )
    counts = {b.id: _counts(b) for b in session.scalars(query).all()}
    for batch_id, found in tallies(session, counts).items():
        _fill(counts[batch_id], found)
    return list(counts.values())


def finished_per_minute(session: Session, batch_id: str) -> list[tuple[int, int]]:
    """The batch's throughput over its life: (unix minute, jobs the workers finished in it,
    done or failed), in time order, minutes with none left out. Reused and cancelled jobs are
    not work done. Counted in the database (one row per minute travels), the same on SQLite and
    PostgreSQL."""
    minute = _unix_minute(session, Job.finished_at)
    rows = session.execute(
        select(minute, func.count())
        .where(
            Job.batch_id == batch_id,
            Job.status.in_((JobStatus.done, JobStatus.failed)),
            Job.reused_from.is_(None),
            Job.finished_at.is_not(None),
        )
        .group_by(minute)
        .order_by(minute)
    ).all()
    return [(int(m), int(n)) for m, n in rows]


def _unix_minute(session: Session, column: Any) -> Any:
    """``column`` (a UTC timestamp) as whole minutes since the epoch, in SQL. SQLite keeps a
    timestamp as text (which ``strftime('%s')`` reads as UTC); PostgreSQL's ``timestamptz``
    gives its epoch directly."""
    if session.get_bind().dialect.name == "sqlite":
        return (cast(func.strftime("%s", column), Integer) // 60).label("minute")
    return cast(func.floor(func.extract("epoch", column) / 60), BigInteger).label("minute")


def batch_failures(
    session: Session, batch_id: str, *, examples: int = 3, limit: int = 20
) -> Failures:
    """The batch's failed jobs grouped by kind (``records.failure_kind``: the reason without
    the input and its own details), most frequent first, each with its first ``examples``
    inputs; at most ``limit`` kinds, and how many kinds and jobs there are in all. Grouped in
    the database, so that a batch of a million failures costs one pass, not a million rows."""
    kind = _failure_kind(session)
    failed = (Job.batch_id == batch_id, Job.status == JobStatus.failed)
    kinds, jobs = session.execute(
        select(func.count(kind.distinct()), func.count()).where(*failed)
    ).one()
    if not jobs:
        return Failures([], 0, 0)
    ranked = (
        select(
            kind.label("kind"),
            Job.input,
            Job.error,
            func.count().over(partition_by=kind).label("n"),
            func.row_number().over(partition_by=kind, order_by=Job.seq).label("rn"),
        )
        .where(*failed)
        .subquery()
    )
    rows = session.execute(
        select(ranked.c.kind, ranked.c.n, ranked.c.input, ranked.c.error)
        .where(ranked.c.rn <= examples)
        .order_by(ranked.c.n.desc(), ranked.c.kind, ranked.c.rn)
        .limit(limit * examples)
    ).all()
    groups: dict[str, FailureGroup] = {}
    for name, n, job_input, error in rows:
        group = groups.get(name)
        if group is None:
            if len(groups) == limit:
                break
            group = groups[name] = FailureGroup(name, int(n), [])
        group.examples.append(FailureExample(job_input, error or ""))
    return Failures(list(groups.values()), int(kinds), int(jobs))


def _failure_kind(session: Session) -> ColumnElement[str]:
    """``records.failure_kind`` of a job's error, in SQL: without a leading "<input>: ", and
    without a trailing parenthesised detail."""
    error = func.coalesce(Job.error, "")
    after = func.length(Job.input) + 3
    reason = case(
        (func.substr(error, 1, after - 1) == Job.input + ": ", func.substr(error, after)),
        else_=error,
    )
    find = func.strpos if session.get_bind().dialect.name == "postgresql" else func.instr
    at = find(reason, " (")
    return case((and_(at > 1, reason.like("%)")), func.substr(reason, 1, at - 1)), else_=reason)


def batch_jobs_page(
    session: Session,
    batch_id: str,
    *,
    offset: int = 0,
    limit: int = 60,
    status: str | None = None,
    after: int | None = None,
    before: int | None = None,
) -> list[JobResult]:
    """A page of the batch's jobs in submission order (only those in ``status``, if given),
    each with its result and first artifact as ``iter_batch_jobs`` gives them.

    Found through keys, never by counting rows, so a page deep in a million-job batch costs
    what the first one does: ``after`` (a job's ``seq``) gives the ``limit`` jobs after it,
    ``before`` the ``limit`` jobs before it (a page back). Without a cursor, the page starts at
    ``offset``: without ``status``, a batch's jobs are numbered 0, 1, 2, ... in submission
    order (``create_batch``), so that is the job whose seq is ``offset``; with ``status``, the
    first ``offset`` of them are skipped (counted: use the cursors to page)."""
    get_batch(session, batch_id)
    if status is None and after is None and before is None:
        after = offset - 1
    skip = 0 if after is not None or before is not None else offset
    newest_first = before is not None and after is None
    parts: list[ColumnElement[bool]] = [Job.lease_until.is_(None), Job.lease_until.is_not(None)]
    if status is None:
        parts = [Job.seq >= 0]  # one part: the (batch, seq) key in order
    rows: list[Row[Any]] = []
    for part in parts:
        # With a state: the (batch, state, lease, seq) index in seq order among the jobs with
        # no lease (finished ones, a queued batch's backlog), and the few with one (running,
        # or queued with a message) apart: each part is one ordered range of the index.
        query = _job_results().where(Job.batch_id == batch_id, part)
        if status is not None:
            query = query.where(Job.status == JobStatus(status))
        if after is not None:
            query = query.where(Job.seq > after)
        if before is not None:
            query = query.where(Job.seq < before)
        order = Job.seq.desc() if newest_first else Job.seq
        rows += session.execute(query.order_by(order).limit(skip + limit)).all()
    rows.sort(key=lambda r: r.seq, reverse=newest_first)
    page = rows[skip : skip + limit]
    if newest_first:
        page.reverse()
    return [_job_result(r) for r in page]


def job_source(session: Session, job_id: str) -> tuple[str, dict[str, Any], str | None] | None:
    """A job's input, its params, and the object-store key of its first artifact (the job
    that computed it, for a reused job); None for an unknown job."""
    source = func.coalesce(Job.reused_from, Job.id)
    row = session.execute(
        select(Job.input, Job.params, Artifact.key)
        .outerjoin(Artifact, (Artifact.job_id == source) & (Artifact.index == 0))
        .where(Job.id == job_id)
    ).first()
    if row is None:
        return None
    return row[0], dict(row[1] or {}), row[2]
