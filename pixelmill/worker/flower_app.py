"""The Celery app that `pixelmill flower` runs Flower with (``celery -A
pixelmill.worker.flower_app flower``): pixelmill's broker settings (TLS, the queue, its
priority steps) and pixelmill's task names, so that Flower lists them among its registered
tasks and can send one, as for any Celery project. Never imported by a worker: the bodies
here only name the tasks; ``pixelmill.worker.tasks`` is where they run."""

from __future__ import annotations

from typing import Any

from pixelmill.settings import load_settings
from pixelmill.wire import NOOP, PROCESS_BATCH, create_app

app = create_app(load_settings())


@app.task(name=PROCESS_BATCH, acks_late=True)  # type: ignore[untyped-decorator]
def process_batch(job_ids: list[str]) -> Any:
    """Claim and process these jobs (a pixelmill worker's task; a message of job ids)."""
    raise RuntimeError("pixelmill.process_batch runs on a pixelmill worker, not in Flower")


@app.task(name=NOOP, acks_late=True)  # type: ignore[untyped-decorator]
def noop() -> None:
    """Do nothing (what `pixelmill bench` measures plain Celery with)."""
    raise RuntimeError("pixelmill.noop runs on a pixelmill worker, not in Flower")
