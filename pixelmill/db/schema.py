"""The SQLAlchemy 2.0 schema: batches, jobs, results, artifacts. SQLite and PostgreSQL alike."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# A job's states live with the records (no SQL there), for readers that import no SQLAlchemy.
from pixelmill.db.records import TERMINAL, JobStatus

__all__ = ["TERMINAL", "JobStatus"]


class Priority(enum.StrEnum):
    """A batch's place in the queue: its messages are taken before those of a lower one."""

    high = "high"
    normal = "normal"
    low = "low"


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Batch(Base):
    """One submission: a task over many inputs with one model and one set of options."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(500))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # What was submitted (task, model, options, inputs as they were on disk): the same submit
    # again finds this batch instead of doing the work twice.
    fingerprint: Mapped[str | None] = mapped_column(String(64), unique=True)
    # What a job's result depends on besides its input's bytes and the model's revision: task,
    # model, options and pixelmill's preprocessing version (``pixelmill.tasks.base.Task.recipe``).
    # None for generate, whose jobs are never reused.
    recipe: Mapped[str | None] = mapped_column(String(64))
    # Task, model, options and the inputs as typed: two runs over the same source at once find
    # each other by it (``pixelmill.producer.client``).
    source_key: Mapped[str | None] = mapped_column(String(64), index=True)
    # What the submit found: {"new": n, "changed": n, "stale": n, "reused": n}.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # high, normal or low: its messages' priority on the broker (``pixelmill.wire``).
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    # Set while the batch is paused: workers start none of its queued jobs.
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when a user cancelled it: its queued jobs ended as cancelled.
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Jobs per message on the broker, which is the images per model batch: how the batch is
    # split into work, not what its results depend on (``pixelmill.wire.message_size``).
    message_size: Mapped[int | None] = mapped_column(Integer)
    # Its weight among the active batches of its priority: the messages it keeps on the broker
    # (its window, ``pixelmill.db.window``) are PIXELMILL_WINDOW x share, and workers take the
    # queue's messages in turn, so a batch of share 2 gets twice the workers of one of share 1.
    share: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class Job(Base):
    """One input of a batch. Its id is what travels on the wire."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "seq", name="uq_jobs_batch_seq"),
        # A batch's jobs by state; among its queued ones, those with a message on the broker
        # (a lease) apart from its backlog (none), each in submit order (``db.window``).
        Index("ix_jobs_batch_window", "batch_id", "status", "lease_until", "seq"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
        # `export --latest SOURCE`: the jobs of the inputs under a folder or prefix, by input.
        Index("ix_jobs_input", "input"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    input: Mapped[str] = mapped_column(Text)
    # Per-job parameters beyond the input (generate: the prompt and this image's seed).
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", native_enum=False, create_constraint=True, length=16),
        default=JobStatus.queued,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Until when the job's holder is trusted with it: a queued job's message, or a running
    # job's worker (renewed by its heartbeat). Past it, the reconciler enqueues the job again.
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The sha256 of the input's bytes when it was submitted (None: a prompt, or a file that
    # could not be read).
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    # A job done at submit with an earlier result: the job that computed it (whose result and
    # artifacts a reader sees for this one).
    reused_from: Mapped[str | None] = mapped_column(String(36))


class JobTally(Base):
    """A batch's job counts per state, kept by triggers on ``jobs`` (migration 0011), so that
    reading them costs the same at a million jobs as at ten (``pixelmill.db.tallies``).

    A row says: ``n`` jobs of ``batch_id`` entered (or, negative, left) ``status`` ("reused"
    counts the jobs done at submit with an earlier result); ``first_at``/``last_at``: the
    earliest start and latest finish (jobs that were not reused) among them. A batch's count
    in a state is the sum of its rows. On PostgreSQL each statement that changes jobs adds
    rows (no two workers wait on one counter); the reconciler folds them into one row per
    state. On SQLite (one writer at a time) the triggers keep one row per state."""

    __tablename__ = "job_tallies"
    __table_args__ = (Index("ix_job_tallies_batch_status", "batch_id", "status"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    # No foreign key: a batch's rows may be written by the triggers of its jobs' deletion.
    batch_id: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(BigInteger)
    first_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Result(Base):
    """One job's result, keyed by job id and written by upsert: a redelivery changes nothing."""

    __tablename__ = "results"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    model: Mapped[str] = mapped_column(String(500))
    model_revision: Mapped[str | None] = mapped_column(String(100))
    device: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """One job's image embedding (task ``embed``): L2-normalised float32, little-endian, as
    bytes (``dim`` x 4 of them), with the model and revision that made it. Keyed by job id and
    written by upsert with the job's result. On PostgreSQL with pgvector, migration 0008 adds a
    ``vec vector`` column beside it (``pixelmill.db.embeddings``) that search orders by."""

    __tablename__ = "embeddings"
    __table_args__ = (Index("ix_embeddings_model", "model", "model_revision", "dim"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(500))
    model_revision: Mapped[str] = mapped_column(String(100))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Artifact(Base):
    """A file a job produced, in the object store under a server-generated key, with what is
    needed to trust and reproduce it. Written (upsert by key) after the object is stored."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_artifacts_job_index"),)

    key: Mapped[str] = mapped_column(String(500), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer, default=0)
    uri: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # Provenance.
    model: Mapped[str] = mapped_column(String(500))
    model_revision: Mapped[str | None] = mapped_column(String(100))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    steps: Mapped[int | None] = mapped_column(Integer)
    precision: Mapped[str | None] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeadLetter(Base):
    """A message the workers could not take (malformed, oversized, of an unknown task, not
    JSON): acknowledged, so never redelivered, and kept here to count and inspect."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # What was wrong: oversized, undecodable, malformed, unknown-task, refused-content.
    kind: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    task: Mapped[str | None] = mapped_column(String(200))
    queue: Mapped[str | None] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(200))
    content_type: Mapped[str | None] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # the whole body, in bytes
    body: Mapped[str] = mapped_column(Text, default="")  # its first bytes only (bounded)
    headers: Mapped[str | None] = mapped_column(Text)  # their repr, bounded
    worker: Mapped[str | None] = mapped_column(String(200))


class SeenFile(Base):
    """The stat fast path of the content index, as git's index: a file whose path, size,
    modification time and inode are as recorded here is not read again (an object: its URI,
    size and ETag); its sha256 is this one."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_etag_size", "etag", "size"),)

    path: Mapped[str] = mapped_column(Text, primary_key=True)  # or an s3:// URI
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    inode: Mapped[int | None] = mapped_column(BigInteger)  # a path retargeted to another file
    # An object's ETag (None for a file): with its size, what says an object is unchanged,
    # and finds the same bytes under another key (a copy or a rename) without fetching them.
    etag: Mapped[str | None] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ContentResult(Base):
    """The content index: which job computed the result for these bytes with this recipe
    (task, model, options, preprocessing version) and model revision. Written by the worker
    with the job's result; read by the producer to reuse it."""

    __tablename__ = "content_results"

    content_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    recipe: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_revision: Mapped[str] = mapped_column(String(100), primary_key=True)
    task: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(500))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelRevision(Base):
    """The revision of a model the workers last ran: what a producer that cannot resolve the
    model itself (a hub id not in its cache, a built-in) takes as current."""

    __tablename__ = "model_revisions"

    task: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(500), primary_key=True)
    revision: Mapped[str] = mapped_column(String(100))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Worker(Base):
    """A device worker process as it last reported itself (every heartbeat): what the
    dashboard's fleet view and the heartbeat-age metric read. A row outlives its process; its
    ``heartbeat_at`` says how long ago it was last heard from."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery's hostname
    host: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(32))
    pid: Mapped[int] = mapped_column(Integer)
    # starting, idle, busy, stopping, stopped.
    state: Mapped[str] = mapped_column(String(16))
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    batch_id: Mapped[str | None] = mapped_column(String(36))  # the batch it works on
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    items: Mapped[int] = mapped_column(BigInteger, default=0)  # finished since it started
    # Items finished per minute over the last minutes: [[unix minute, items], ...].
    recent: Mapped[list[list[int]]] = mapped_column(JSON, default=list)
    # Device memory in bytes (allocated by this process, and the device's total), if known.
    memory_used: Mapped[int | None] = mapped_column(BigInteger)
    memory_total: Mapped[int | None] = mapped_column(BigInteger)
    utilization: Mapped[float | None] = mapped_column(Float)  # GPU busy fraction (NVML)


class MetricTotal(Base):
    """Running totals behind the Prometheus counters and histograms, added to in the same
    transaction as the state change they count: they hold across processes and hosts, and
    survive any restart. ``name`` is the metric, ``key`` the outcome or histogram bucket
    (``le=0.5``, ``sum``, ``count``)."""

    __tablename__ = "metric_totals"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(500), primary_key=True)
    device: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[float] = mapped_column(Float, default=0.0)
