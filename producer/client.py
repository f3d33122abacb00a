"""The Python API: ``Client.submit``, ``wait``, ``status``, ``results``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_sessionmaker
from db.jobs import (
    BatchCounts,
    JobRow,
    batch_counts,
    create_batch,
    failure_reasons,
    iter_batch_jobs,
)
from db.migrate import upgrade
from pixelmill.catalog import DEFAULT_MODELS, TASKS
from pixelmill.errors import ServiceUnavailable
from pixelmill.settings import Settings, load_settings, mask_url
from producer.inputs import InputError, expand_inputs
from worker.app import PROCESS_BATCH, create_app


@dataclass(frozen=True)
class Submission:
    batch_id: str
    jobs: int


@dataclass(frozen=True)
class JobResult:
    job: str
    input: str
    task: str
    status: str
    result: dict[str, Any] | None
    error: str | None
    model: str
    device: str | None

    @classmethod
    def from_row(cls, row: JobRow) -> JobResult:
        return cls(
            job=row.job_id,
            input=row.input,
            task=row.task,
            status=row.status.value,
            result=row.result,
            error=row.error,
            model=row.model,
            device=row.device,
        )

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
        }


class Client:
    """A producer connected to the configured (or embedded) database and broker."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self.engine = make_engine(self.settings.resolved_database_url())
        upgrade(self.engine)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            self._app = create_app(self.settings)
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
        self.engine.dispose()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- submit --------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        inputs: Iterable[str],
        *,
        model: str | None = None,
        name: str | None = None,
        batch_size: int | None = None,
    ) -> Submission:
        """Register one job per input, commit, then enqueue the job ids in chunks of
        ``batch_size`` (one message per model batch)."""
        if task not in TASKS:
            raise InputError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
        paths = expand_inputs(inputs)
        if not paths:
            raise InputError("no input images found")
        self.check_broker()
        size = batch_size or self.settings.batch_size
        with self.sessions.begin() as session:
            new = create_batch(
                session,
                task=task,
                model=model or DEFAULT_MODELS[task],
                inputs=paths,
                name=name,
                options={"batch_size": size},
            )
        self._enqueue(new.job_ids, size)
        return Submission(batch_id=new.batch_id, jobs=len(new.job_ids))

    def check_broker(self) -> None:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds here
            where = mask_url(self.settings.resolved_broker_url())
            hint = (
                " (nothing configured: start `pixelmill worker` for the embedded broker, "
                "use `pixelmill run`, or set PIXELMILL_BROKER_URL)"
                if self.settings.embedded_broker
                else ""
            )
            raise ServiceUnavailable(f"cannot reach the broker at {where}: {exc}{hint}") from None

    def _enqueue(self, job_ids: list[str], size: int) -> None:
        with self.app.producer_or_acquire() as producer:
            for start in range(0, len(job_ids), size):
                self.app.send_task(
                    PROCESS_BATCH,
                    args=[job_ids[start : start + size]],
                    producer=producer,
                )

    # ---- read ----------------------------------------------------------------------------

    def status(self, batch_id: str) -> BatchCounts:
        with self.sessions() as session:
            return batch_counts(session, batch_id)

    def failures(self, batch_id: str) -> list[tuple[str, int]]:
        with self.sessions() as session:
            return failure_reasons(session, batch_id)

    def wait(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        interval: float = 0.5,
        on_progress: Callable[[BatchCounts], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> BatchCounts:
        """Block until every job of the batch is done or failed; returns the final counts.
        ``check`` runs each round (e.g. to supervise local workers); ``TimeoutError`` after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            counts = self.status(batch_id)
            if on_progress is not None:
                on_progress(counts)
            if counts.complete:
                return counts
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"batch {batch_id}: {counts.finished}/{counts.total} finished after "
                    f"{timeout:.0f}s"
                )
            if check is not None:
                check()
            time.sleep(interval)

    def results(self, batch_id: str) -> Iterator[JobResult]:
        with self.sessions() as session:
            for row in iter_batch_jobs(session, batch_id):
                yield JobResult.from_row(row)
