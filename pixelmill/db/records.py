"""The plain records the db layer takes and hands out: a new batch, a claimed job, a job's
outcome and its artifacts, a batch's counts, stranded jobs, and a job as a reader sees it
(``JobResult``). Frozen dataclasses (``BatchCounts`` aside), no SQL: the state changes are in
``pixelmill.db.jobs``, the reads in ``pixelmill.db.reads``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class JobStatus(enum.StrEnum):
    """A job's state. It moves forward: queued -> running -> done | failed, or queued ->
    cancelled (a user's ``cancel``). The ways back: a user's ``retry`` (failed -> queued), and
    the reconciler's (running -> queued, when the job's worker died and its lease ran out)."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


# The states a job ends in.
TERMINAL = (JobStatus.done, JobStatus.failed, JobStatus.cancelled)


@dataclass(frozen=True)
class NewBatch:
    """A registered batch: its id, the ids of the queued jobs to enqueue now, in order (its
    first window, or all of them), and how many jobs it has queued in all; its reused jobs
    are done already."""

    batch_id: str
    job_ids: list[str]
    queued: int


@dataclass(frozen=True)
class BatchInfo:
    """A batch's task, model and options: fixed once the batch exists, so a worker may keep
    them and pass them to ``claim_jobs(known=...)`` instead of reading them for every message.
    One object per batch, shared by its claimed jobs (never copied into each)."""

    task: str
    model: str
    options: dict[str, Any]


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run one job."""

    job_id: str
    batch_id: str
    input: str
    params: dict[str, Any]
    batch: BatchInfo
    attempts: int
    # The sha256 the producer hashed (None: a prompt, or a job no result will be reused from):
    # the worker checks it against the bytes it reads.
    content_sha256: str | None = None

    @property
    def task(self) -> str:
        return self.batch.task

    @property
    def model(self) -> str:
        return self.batch.model


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
class ContentSeen:
    """An input's bytes as a worker read them: their sha256 (None: not hashed, a file too large
    to hold), which becomes the job's, and for an s3:// object its ETag, which with its size
    goes into the content index's fast path."""

    uri: str
    size: int
    etag: str | None
    sha256: str | None


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
    content: ContentSeen | None = None
    # An embed job's image embedding: float32 little-endian bytes (``db.embeddings.to_bytes``).
    embedding: bytes | None = None


@dataclass(frozen=True)
class Stranded:
    """Jobs of one batch whose lease ran out, to enqueue again, in messages of the batch's
    ``message_size`` (``pixelmill.wire.message_size``) at its priority."""

    batch_id: str
    job_ids: list[str]
    message_size: int | None
    priority: str = "normal"


@dataclass(frozen=True)
class JobResult:
    """One job as a reader sees it (``Client.results``, ``iter_batch_jobs``): its input, its
    state (a ``JobStatus`` value), its result or error, and its first artifact, if any."""

    job: str
    input: str
    task: str
    status: str
    result: dict[str, Any] | None
    error: str | None
    model: str
    device: str | None
    artifact: ArtifactRecord | None = None
    attempts: int = 0  # the starts that count against PIXELMILL_MAX_ATTEMPTS
    content_sha256: str | None = None  # of the input's bytes, when submitted
    reused_from: str | None = None  # the job whose result this one took, at submit
    model_revision: str | None = None
    finished_at: datetime | None = None  # UTC
    batch_id: str | None = None
    seq: int | None = None  # its place in the batch: 0, 1, 2, ... in submission order

    @property
    def job_id(self) -> str:
        return self.job

    @property
    def reused(self) -> bool:
        return self.reused_from is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "input": self.input,
            "task": self.task,
            "status": self.status,
            "result": self.result,
            "error": self.error,
            "model": self.model,
            "device": self.device,
            "artifact": self.artifact.uri if self.artifact else None,
            "sha256": self.content_sha256,
            "revision": self.model_revision,
            "reused": self.reused,
            "reused_from": self.reused_from,
        }


@dataclass
class BatchCounts:
    batch_id: str
    task: str
    model: str
    name: str | None
    total: int
    by_status: dict[str, int] = field(default_factory=dict)
    created_at: datetime | None = None  # UTC
    reused: int = 0  # jobs done at submit with an earlier result
    plan: dict[str, int] | None = None  # what the submit found: new, changed, stale, reused
    started_at: datetime | None = None  # the first job a worker started (UTC)
    last_finished_at: datetime | None = None  # the last job a worker finished (UTC)
    priority: str = "normal"  # high, normal or low
    paused: bool = False  # workers start none of its queued jobs until it is resumed
    cancelled: bool = False  # a user cancelled it: its queued jobs ended as cancelled

    @property
    def finished(self) -> int:
        """Jobs in a terminal state: done, failed or cancelled."""
        return sum(self.by_status.get(s, 0) for s in ("done", "failed", "cancelled"))

    @property
    def state(self) -> str:
        """The batch as a whole: cancelled, paused, finished, running or queued."""
        if self.cancelled:
            return "cancelled"
        if self.complete:
            return "finished"
        if self.paused:
            return "paused"
        worked = self.finished - self.reused - self.by_status.get("cancelled", 0) > 0
        running = self.by_status.get("running") or self.started_at or worked
        return "running" if running else "queued"

    @property
    def complete(self) -> bool:
        return self.finished >= self.total

    def rate(self, now: datetime) -> float | None:
        """Jobs the workers finished per second so far (reused and cancelled ones not
        counted)."""
        processed = self.finished - self.reused - self.by_status.get("cancelled", 0)
        if self.started_at is None or processed <= 0:
            return None
        end = self.last_finished_at if self.complete and self.last_finished_at else now
        seconds = (end - self.started_at).total_seconds()
        return processed / seconds if seconds > 0 else None

    def eta_seconds(self, now: datetime) -> float | None:
        """Seconds until every job is finished at the rate so far; None if not known yet."""
        if self.complete:
            return 0.0
        rate = self.rate(now)
        return (self.total - self.finished) / rate if rate else None


@dataclass(frozen=True)
class WorkerReport:
    """A device worker process as it reports itself at each heartbeat (``pixelmill.db.fleet``)
    and as the dashboard reads it back (``heartbeat_at`` UTC)."""

    name: str  # Celery's hostname for it: unique per host and device
    host: str
    device: str  # cuda:N or cpu
    pid: int
    state: str  # starting, idle, busy, stopping, stopped
    models: tuple[str, ...] = ()
    batch_id: str | None = None  # the batch it works on
    items: int = 0  # finished since it started
    recent: tuple[tuple[int, int], ...] = ()  # (unix minute, items finished in it)
    memory_used: int | None = None  # bytes
    memory_total: int | None = None
    utilization: float | None = None  # 0..1, NVML
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None


@dataclass(frozen=True)
class FailureExample:
    input: str
    error: str  # the job's whole error

    @property
    def detail(self) -> str:
        """What the error says about this input beyond its kind ("" if nothing)."""
        return failure_kind(self.error, self.input)[1]


@dataclass(frozen=True)
class FailureGroup:
    kind: str  # the reason without the input and its own details: one per kind of failure
    jobs: int
    examples: list[FailureExample]  # the first few, in submission order


@dataclass(frozen=True)
class Failures:
    """A batch's failed jobs by kind, most frequent first; ``groups`` may hold fewer kinds
    than ``kinds`` (the rest: ``more_kinds`` of them, ``more_jobs`` jobs between them)."""

    groups: list[FailureGroup]
    kinds: int
    jobs: int

    @property
    def more_kinds(self) -> int:
        return self.kinds - len(self.groups)

    @property
    def more_jobs(self) -> int:
        return self.jobs - sum(g.jobs for g in self.groups)


def failure_kind(error: str, job_input: str) -> tuple[str, str]:
    """An error split into (kind, detail). Errors read "<input>: <reason>", and a reason may
    end in a parenthesised detail of this input ("corrupt or truncated image (image file is
    truncated (64 bytes not processed))"): the kind is the reason without either, so that
    one kind over many files is one group. ``pixelmill.db.reads.batch_failures`` groups by the same
    rule in SQL."""
    reason = error
    if job_input and error.startswith(job_input + ": "):
        reason = error[len(job_input) + 2 :]
    at = reason.find(" (")
    if at > 0 and reason.endswith(")"):
        return reason[:at], reason[at + 1 :]
    return reason, ""


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite keeps no zone; what pixelmill writes there is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
