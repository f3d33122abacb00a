"""Refusing bad messages: every message is checked on arrival, before Celery builds a request
from it; one that cannot be run (not JSON, malformed, oversized, of an unknown task) is
acknowledged (removed from the queue, never redelivered), logged at WARNING and recorded in the
``dead_letters`` table (``pixelmill.db.dead_letters``).

Why here: Celery's consumer hands a message to the task's strategy, which unpacks the body in
the consumer's own loop. A body that is not ``[args, kwargs, embed]`` (``{"garbage": true}``,
``null``, ``5``) raises there, outside any handler: the worker stops ("Unrecoverable error"),
the unacked message is restored to the queue, and the next worker takes it and stops too. A
message of a million ids reached the task and failed its claim ("too many SQL variables"),
which was retried with backoff 20 times. Checking the message first, in a consumer of our own
(``worker_consumer``), catches each of these, and the consumer's own hooks for what Celery and
kombu detect themselves (undecodable, refused content type, unknown task, not a task message)
record those too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.worker.consumer import Consumer
from kombu.utils.encoding import safe_repr
from sqlalchemy.orm import Session, sessionmaker

from pixelmill.db.dead_letters import (
    HEADERS_PREFIX,
    DeadLetterRecord,
    body_prefix,
    record_dead_letter,
)
from pixelmill.wire import MAX_BATCH_IDS, MAX_JOB_ID_LENGTH, MAX_MESSAGE_BYTES, NOOP, PROCESS_BATCH

log = logging.getLogger("pixelmill.deadletter")

JSON_TYPE = "application/json"


@dataclass(frozen=True)
class Refusal:
    """Why a message is refused. ``kind``: oversized, undecodable, malformed, unknown-task,
    refused-content."""

    kind: str
    reason: str


def _batch_args(args: list[Any], kwargs: dict[str, Any]) -> Refusal | None:
    if kwargs:
        return Refusal("malformed", f"unexpected keyword arguments {sorted(kwargs)!r:.200}")
    if len(args) != 1 or not isinstance(args[0], list):
        return Refusal("malformed", "args must be [job_ids], one list of job ids")
    ids = args[0]
    if len(ids) > MAX_BATCH_IDS:
        return Refusal("oversized", f"{len(ids)} job ids, more than the {MAX_BATCH_IDS} allowed")
    for job_id in ids:
        if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
            return Refusal("malformed", f"not a job id: {job_id!r:.100}")
    return None


def _no_args(args: list[Any], kwargs: dict[str, Any]) -> Refusal | None:
    if args or kwargs:
        return Refusal("malformed", "this task takes no arguments")
    return None


# The tasks a worker runs, each with the check of its arguments; any other name is refused.
TASK_ARGS: dict[str, Callable[[list[Any], dict[str, Any]], Refusal | None]] = {
    PROCESS_BATCH: _batch_args,
    NOOP: _no_args,
}


def check_message(message: Any) -> Refusal | None:
    """None if ``message`` (a kombu message) is one of our tasks, well formed, within limits.

    Cheap checks first: the body's size is known before it is decoded, and a refused content
    type (pickle) is never decoded at all."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return Refusal("malformed", "not a Celery task message (no task header)")
    task = headers["task"]
    if not isinstance(task, str) or task not in TASK_ARGS:
        return Refusal("unknown-task", f"unknown task {task!r:.200}")
    if not isinstance(headers.get("id"), str):
        return Refusal("malformed", "no task id header")
    body = message.body
    size = len(body) if isinstance(body, bytes | str) else 0
    if size > MAX_MESSAGE_BYTES:
        return Refusal("oversized", f"body of {size} bytes, more than the {MAX_MESSAGE_BYTES}")
    if message.content_type != JSON_TYPE:
        return Refusal("refused-content", f"content type {message.content_type!r:.100}: JSON only")
    if headers.get("compression"):
        return Refusal("refused-content", "compressed message: pixelmill never compresses")
    try:
        payload = message.decode()
    except Exception as exc:  # noqa: BLE001 - kombu raises DecodeError, ContentDisallowed, ...
        return Refusal("undecodable", f"body is not JSON: {exc}")
    if not isinstance(payload, list) or len(payload) != 3:
        return Refusal("malformed", "body is not [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return Refusal("malformed", "body is not [args, kwargs, embed]: args or kwargs")
    if embed is not None and not isinstance(embed, dict):
        return Refusal("malformed", "body is not [args, kwargs, embed]: embed")
    return TASK_ARGS[task](args, kwargs)


class DeadLetters:
    """Where refused messages go: the database, and the log. Never raises."""

    def __init__(
        self, sessions: sessionmaker[Session] | None, *, queue: str | None, worker: str | None
    ) -> None:
        self.sessions = sessions
        self.queue = queue
        self.worker = worker

    def record(self, message: Any, refusal: Refusal) -> DeadLetterRecord:
        record = self.describe(message, refusal)
        log.warning(
            "dead letter (%s): %s; task %s, id %s, %d bytes on %s: acknowledged, not redelivered",
            record.kind, record.reason, record.task, record.message_id, record.size, record.queue,
        )  # fmt: skip
        if self.sessions is None:
            log.error("dead letter not stored (no database): %s", json.dumps(record.to_json()))
            return record
        try:
            with self.sessions.begin() as session:
                record_dead_letter(session, record)
        except Exception as exc:  # noqa: BLE001 - the database away: the log keeps it all
            log.error(
                "dead letter not stored (database: %s): %s",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                json.dumps(record.to_json()),
            )
        return record

    def describe(self, message: Any, refusal: Refusal) -> DeadLetterRecord:
        headers = message.headers if isinstance(message.headers, dict) else {}
        delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        body = message.body
        return DeadLetterRecord(
            kind=refusal.kind,
            reason=refusal.reason,
            task=_text(headers.get("task")),
            queue=_text(delivery.get("routing_key")) or self.queue,
            message_id=_text(headers.get("id")),
            content_type=_text(message.content_type),
            size=len(body) if isinstance(body, bytes | str) else 0,
            body=body_prefix(body if isinstance(body, bytes | str) else None),
            headers=str(safe_repr(message.headers))[:HEADERS_PREFIX],  # type: ignore[no-untyped-call]
            worker=self.worker,
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _settle(message: Any) -> None:
    """Acknowledge: the message leaves the queue for good (on Redis, a reject without requeue
    is the same thing)."""
    if not message.acknowledged:
        message.ack()


class DeadLetterConsumer(Consumer):  # type: ignore[misc]  # Celery ships no type hints
    """Celery's consumer, refusing bad messages before they reach a strategy."""

    dead_letters: DeadLetters = DeadLetters(None, queue=None, worker=None)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors or ())

        def on_task_received(message: Any) -> Any:
            try:
                refusal = check_message(message)
            except Exception as exc:  # noqa: BLE001 - a check that breaks refuses, never stops
                refusal = Refusal("malformed", f"cannot check the message: {exc!r:.300}")
            if refusal is not None:
                self.dead_letters.record(message, refusal)
                _settle(message)
                return None
            try:
                return handle(message)
            except connection_errors:
                raise  # the broker went away: Celery reconnects, the message comes back
            except Exception as exc:  # noqa: BLE001 - nothing a message holds stops a worker
                self.dead_letters.record(message, Refusal("malformed", f"{exc!r:.500}"))
                if not message.acknowledged:
                    _settle(message)
                return None

        return on_task_received

    # What Celery and kombu find themselves (before the handler above, or as a fallback).

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self.dead_letters.record(message, Refusal("undecodable", f"cannot decode: {exc!r:.500}"))
        _settle(message)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.dead_letters.record(message, Refusal("malformed", "not a Celery task message"))
        _settle(message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = message.headers.get("task") if isinstance(message.headers, dict) else None
        self.dead_letters.record(message, Refusal("unknown-task", f"unknown task {name!r:.200}"))
        _settle(message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.dead_letters.record(message, Refusal("malformed", f"invalid task: {exc!r:.500}"))
        _settle(message)


def dead_letter_consumer(dead_letters: DeadLetters) -> type[DeadLetterConsumer]:
    """A consumer class (for ``app.conf.worker_consumer``) recording into ``dead_letters``."""
    return type("PixelmillConsumer", (DeadLetterConsumer,), {"dead_letters": dead_letters})
