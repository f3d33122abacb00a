"""The Celery task. Thin: it checks the message and calls ``worker.batching.process_batch``."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from sqlalchemy.exc import OperationalError

from db.store import StoreError
from worker.app import NOOP, PROCESS_BATCH
from worker.batching import WorkerContext, process_batch

log = logging.getLogger(__name__)


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    @app.task(
        name=PROCESS_BATCH,
        bind=True,
        acks_late=True,
        # The database or the object store being briefly away is transient: retry with
        # capped backoff. Bad inputs and unusable models fail their jobs instead (no retry).
        autoretry_for=(OperationalError, StoreError),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=20,
    )
    def process_batch_task(self: Any, job_ids: list[str]) -> dict[str, Any]:
        if not isinstance(job_ids, list) or not all(isinstance(j, str) for j in job_ids):
            raise Reject(f"malformed message: expected a list of job ids, got {job_ids!r}")
        report = process_batch(ctx, job_ids)
        log.info(
            "batch of %d: %d done, %d failed in %.2fs on %s",
            report.claimed, report.done, report.failed, report.seconds, ctx.device_label,
        )  # fmt: skip
        return asdict(report)

    @app.task(name=NOOP, acks_late=True)
    def noop() -> None:
        return None
