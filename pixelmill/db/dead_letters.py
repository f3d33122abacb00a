"""Dead letters: messages the workers refused (malformed, oversized, unknown task, not JSON).

Each one was acknowledged (removed from the queue, never redelivered) and is kept here, with
its reason and the first bytes of its body, to be counted and inspected
(``pixelmill dead-letters``, or SQL on the ``dead_letters`` table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pixelmill.db.schema import DeadLetter, utcnow

BODY_PREFIX = 2048  # bytes of a refused body that are kept
HEADERS_PREFIX = 2048  # characters of its headers' repr that are kept


@dataclass(frozen=True)
class DeadLetterRecord:
    kind: str
    reason: str
    task: str | None = None
    queue: str | None = None
    message_id: str | None = None
    content_type: str | None = None
    size: int = 0
    body: str = ""
    headers: str | None = None
    worker: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return data


def body_prefix(body: bytes | str | None) -> str:
    """The first ``BODY_PREFIX`` bytes of a body, as text (undecodable bytes as ``\\x..``)."""
    if body is None:
        return ""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    return body[:BODY_PREFIX].decode("utf-8", "backslashreplace")


def record_dead_letter(session: Session, record: DeadLetterRecord) -> int:
    row = DeadLetter(
        created_at=record.created_at,
        kind=record.kind[:32],
        reason=record.reason,
        task=_cut(record.task, 200),
        queue=_cut(record.queue, 200),
        message_id=_cut(record.message_id, 200),
        content_type=_cut(record.content_type, 100),
        size=record.size,
        body=record.body[: BODY_PREFIX * 4],  # escaped bytes take up to 4 characters
        headers=_cut(record.headers, HEADERS_PREFIX),
        worker=_cut(record.worker, 200),
    )
    session.add(row)
    session.flush()
    return row.id


def count_dead_letters(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(DeadLetter)) or 0)


def recent_dead_letters(session: Session, limit: int = 20) -> list[DeadLetterRecord]:
    """The newest first."""
    rows = session.scalars(
        select(DeadLetter).order_by(DeadLetter.created_at.desc(), DeadLetter.id.desc()).limit(limit)
    )
    return [
        DeadLetterRecord(
            id=row.id,
            created_at=_aware(row.created_at),
            kind=row.kind,
            reason=row.reason,
            task=row.task,
            queue=row.queue,
            message_id=row.message_id,
            content_type=row.content_type,
            size=row.size,
            body=row.body,
            headers=row.headers,
            worker=row.worker,
        )
        for row in rows
    ]


def _cut(value: str | None, n: int) -> str | None:
    return None if value is None else value[:n]


def _aware(when: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
