"""The Celery app. Light on purpose: producers import it to enqueue, and it never imports torch.

Settings chosen for this design (see README, "How a batch flows"):
- JSON only, on the wire and for results: a pickled message is rejected, never executed.
- Late acks + reject on worker lost: a message is acked only after its batch's results are
  committed; a worker that dies mid-batch gets the batch redelivered.
- Prefetch multiplier 1: a device worker reserves no more batches than it works on
  (its pipeline depth), so idle workers on other devices get the rest.
- Results are not stored in Redis: the database is the source of truth.
"""

from __future__ import annotations

from celery import Celery

from pixelmill.settings import Settings

PROCESS_BATCH = "pixelmill.process_batch"
NOOP = "pixelmill.noop"  # does nothing: `pixelmill bench` measures plain Celery with it


def create_app(settings: Settings) -> Celery:
    app = Celery("pixelmill", broker=settings.resolved_broker_url())
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app
