"""The plain records the db layer takes and hands out: a new batch, a claimed job, a job's
outcome and its artifacts, a batch's counts, stranded jobs, and a job as a reader sees it
(``JobResult``). Frozen dataclasses (``BatchCounts`` aside), no SQL: the state changes are in
``pixelmill.db.jobs``, the reads in ``pixelmill.db.reads``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class NewBatch:
    batch_id: str
    job_ids: list[str]


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
class Stranded:
    """Jobs of one batch whose lease ran out, to enqueue again; ``options`` are the batch's
    (its message size is the queue's business: ``pixelmill.wire.message_size``)."""

    batch_id: str
    job_ids: list[str]
    options: dict[str, Any] | None


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

    @property
    def job_id(self) -> str:
        return self.job

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

    @property
    def finished(self) -> int:
        return self.by_status.get("done", 0) + self.by_status.get("failed", 0)

    @property
    def complete(self) -> bool:
        return self.finished >= self.total
