"""The Celery task. Thin: it checks the message and calls
``pixelmill.worker.batching.process_batch``.

Messages are checked on arrival by the worker's consumer (``pixelmill.worker.message_check``): one
that is malformed, oversized, of an unknown task or not JSON is dead-lettered and never reaches
a task.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from celery import Celery
from celery.exceptions import Reject

from pixelmill.db.window import Window
from pixelmill.wire import NOOP, PROCESS_BATCH, enqueue
from pixelmill.worker.batching import WorkerContext, process_batch
from pixelmill.worker.message_check import DeadLetters, dead_letter_consumer

log = logging.getLogger(__name__)


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    # Before the worker starts: its consumer refuses bad messages into the dead letters.
    dead_letters = DeadLetters(
        ctx.sessions, queue=app.conf.task_default_queue, worker=ctx.worker_name
    )
    app.conf.worker_consumer = dead_letter_consumer(dead_letters)

    def send(window: Window) -> None:  # a claim's top-up: its batches' next messages
        enqueue(app, window.job_ids, window.size, window.priority)

    ctx.send = send

    @app.task(  # type: ignore[untyped-decorator]  # Celery ships no type hints
        name=PROCESS_BATCH,
        bind=True,
        acks_late=True,
        # No Celery retry: a retry claims the jobs again and counts an attempt. process_batch
        # retries transient errors (database, object store) in place, then fails the jobs
        # with the real reason; a failed task leaves them to the reconciler.
    )
    def process_batch_task(self: Any, job_ids: list[str]) -> dict[str, Any]:
        # The consumer checked this already; a message that still gets here is refused too.
        if not isinstance(job_ids, list) or not all(isinstance(j, str) for j in job_ids):
            raise Reject(f"malformed message: expected a list of job ids, got {job_ids!r:.200}")
        report = process_batch(ctx, job_ids)
        log.info(
            "batch of %d: %d done, %d failed in %.2fs on %s",
            report.claimed, report.done, report.failed, report.seconds, ctx.device_label,
        )  # fmt: skip
        return asdict(report)

    @app.task(name=NOOP, acks_late=True)  # type: ignore[untyped-decorator]  # as above
    def noop() -> None:
        return None
