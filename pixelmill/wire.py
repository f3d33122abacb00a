"""The Celery app. Light on purpose: producers import it to enqueue, and it never imports torch.

Settings chosen for this design (docs/design.md):
- JSON only, on the wire and for results: a pickled message is rejected, never executed.
- Late acks + reject on worker lost: a message is acked only after its batch's results are
  committed. A worker that dies mid-batch leaves its message unacked; its jobs come back through
  the reconciler (leases, ``pixelmill.worker.reconciler``) long before the visibility timeout.
- Visibility timeout 6 h (PIXELMILL_VISIBILITY_TIMEOUT): longer than any batch, so that a slow
  generation batch is never handed to a second worker while the first still runs it.
- Prefetch multiplier 1: a device worker reserves no more batches than it works on
  (its pipeline depth), so idle workers on other devices get the rest.
- Results are not stored in Redis: the database is the source of truth.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pixelmill.catalog import DEFAULT_MESSAGE_SIZE, message_size

__all__ = ["DEFAULT_MESSAGE_SIZE", "message_size"]  # where producers and workers find them

# Celery and the settings are imported where an app is made: the names and constants here are
# read by commands that never talk to the broker (`pixelmill status`, `pause`, `cancel`).
if TYPE_CHECKING:
    from celery import Celery

    from pixelmill.settings import Settings

PROCESS_BATCH = "pixelmill.process_batch"
NOOP = "pixelmill.noop"  # does nothing: `pixelmill bench` measures plain Celery with it

# The largest message a worker takes; a bigger one is refused as permanent on arrival and
# dead-lettered (``pixelmill.worker.message_check``), never retried. Producers never make one:
# ``enqueue`` cuts at MAX_BATCH_IDS (also the largest --batch-size), and job ids are
# 36-character UUIDs.
MAX_BATCH_IDS = 4096  # job ids per message
MAX_JOB_ID_LENGTH = 64  # characters of one job id
MAX_MESSAGE_BYTES = 1 << 20  # a message body (JSON); 4096 ids take about 164 KB


# A batch's priority -> its messages' priority on Redis. kombu's Redis transport keeps one list
# per priority step (the queue's name, then "<queue>\x06\x163", "<queue>\x06\x166", ...) and
# every worker's BRPOP names them in step order, so a message on a lower step is always taken
# first: on Redis, 0 is the highest priority. A message sent without one lands on step 0.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITIES = {"high": 0, "normal": 3, "low": 6}


def broker_ssl(settings: Settings) -> dict[str, Any] | None:
    """TLS for a rediss:// broker: the certificate is always verified (against
    PIXELMILL_BROKER_CA_CERTS, or the system's CAs)."""
    if not settings.resolved_broker_url().startswith("rediss://"):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.broker_ca_certs is not None:
        options["ssl_ca_certs"] = str(settings.broker_ca_certs)
    return options


def create_app(settings: Settings) -> Celery:
    from celery import Celery

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
        # Redis redelivers an unacked message after this long. Longer than any batch (a slow
        # generation batch must not run twice); dead workers' jobs come back much sooner
        # through the reconciler (leases), not through this.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": list(PRIORITY_STEPS),
            "queue_order_strategy": "priority",
        },
        # Reconnect forever and resume consuming when the broker comes back.
        broker_connection_retry=True,
        broker_use_ssl=broker_ssl(settings),
    )
    return app


def enqueue(app: Celery, job_ids: list[str], size: int, priority: str = "normal") -> int:
    """One message per ``size`` job ids, in order, at a batch's ``priority`` (high, normal,
    low); returns the number of messages."""
    messages = 0
    size = max(1, min(size, MAX_BATCH_IDS))  # a bigger message would be refused
    level = PRIORITIES[priority]
    with app.producer_or_acquire() as producer:
        for start in range(0, len(job_ids), size):
            app.send_task(
                PROCESS_BATCH,
                args=[job_ids[start : start + size]],
                producer=producer,
                priority=level,
            )
            messages += 1
    return messages


# A random value pixelmill keeps in Redis beside the queues: it lives and dies with them. When
# the value a reconciler saw is gone (or another took its place), the broker lost its data
# (restarted without persistence, flushed, replaced), and every message with it.
EPOCH_KEY = "pixelmill:broker-epoch"
RECOVERY_TTL = 24 * 3600  # how long the "recovered" marker of an epoch stays


@contextlib.contextmanager
def _redis(app: Celery) -> Iterator[Any]:
    """The broker's own Redis client (through kombu's channel: its URL, TLS and pool)."""
    with (
        app.connection_for_write() as conn,
        conn.channel() as channel,
        channel.conn_or_acquire() as client,
    ):
        yield client


def broker_epoch(app: Celery) -> str:
    """The broker's current epoch (made here if it has none)."""
    import uuid

    with _redis(app) as client:
        client.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)  # kept if there is one
        value = client.get(EPOCH_KEY)
    return value.decode() if isinstance(value, bytes) else str(value)


def claim_recovery(app: Celery, epoch: str) -> bool:
    """True for exactly one caller per ``epoch``: the one that enqueues again what the broker
    lost (several reconcilers may notice the same loss)."""
    with _redis(app) as client:
        return bool(client.set(f"{EPOCH_KEY}:recovered:{epoch}", "1", nx=True, ex=RECOVERY_TTL))


def broker_memory(app: Celery) -> int:
    """Bytes the broker's Redis uses (``used_memory``): what a backlog would cost it."""
    with _redis(app) as client:
        return int(client.info("memory")["used_memory"])


def queue_lengths(app: Celery, queue: str) -> dict[str, int]:
    """Messages waiting per priority (high, normal, low, and "other" for the last step): the
    length of each Redis list the queue really uses. Empty on another transport."""
    names = {v: k for k, v in PRIORITIES.items()}
    with app.connection_for_read() as conn, conn.channel() as channel:
        q_for_pri = getattr(channel, "_q_for_pri", None)
        if q_for_pri is None:
            return {}
        with channel.conn_or_acquire() as client, client.pipeline() as pipe:
            for step in PRIORITY_STEPS:
                pipe.llen(q_for_pri(queue, step))
            sizes = pipe.execute()
    return {names.get(step, "other"): int(n) for step, n in zip(PRIORITY_STEPS, sizes, strict=True)}


def queue_length(app: Celery, queue: str) -> int:
    """Messages waiting in the broker's queue (not counting those workers hold)."""
    with app.connection_for_read() as conn, conn.channel() as channel:
        size = getattr(channel, "_size", None)  # the Redis transport: LLEN over priorities
        if size is not None:
            return int(size(queue))
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:  # never declared, or the broker was wiped
            return 0
