"""The workers table: each device worker process's own report, written at every heartbeat and
read by the dashboard's fleet view and the metrics (heartbeat age, device memory)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import cast

from sqlalchemy import Table, delete, select
from sqlalchemy.orm import Session

from pixelmill.db.records import WorkerReport, as_utc
from pixelmill.db.schema import Worker, utcnow
from pixelmill.db.upsert import upsert

WORKERS = cast(Table, Worker.__table__)


def report_worker(session: Session, report: WorkerReport) -> None:
    """Write the worker's row (by name), stamped now; a restarted worker overwrites its
    predecessor's row on the same host and device."""
    now = utcnow()
    row = asdict(report)
    row["models"] = list(report.models)
    row["recent"] = [list(pair) for pair in report.recent]
    row["started_at"] = report.started_at or now
    row["heartbeat_at"] = now
    upsert(session.connection(), WORKERS, [row], key=["name"])


def list_workers(session: Session, *, seen_within: float = 86400) -> list[WorkerReport]:
    """The workers heard from within ``seen_within`` seconds, by name."""
    since = utcnow() - timedelta(seconds=seen_within)
    rows = session.scalars(
        select(Worker).where(Worker.heartbeat_at >= since).order_by(Worker.name)
    ).all()
    return [
        WorkerReport(
            name=w.name,
            host=w.host,
            device=w.device,
            pid=w.pid,
            state=w.state,
            models=tuple(w.models or ()),
            batch_id=w.batch_id,
            items=w.items,
            recent=tuple((int(m), int(n)) for m, n in (w.recent or ())),
            memory_used=w.memory_used,
            memory_total=w.memory_total,
            utilization=w.utilization,
            started_at=as_utc(w.started_at),
            heartbeat_at=as_utc(w.heartbeat_at),
        )  # fmt: skip
        for w in rows
    ]


def forget_workers(session: Session, *, older_than: float = 7 * 86400) -> int:
    """Delete the rows of workers not heard from for ``older_than`` seconds."""
    result = session.execute(
        delete(Worker).where(Worker.heartbeat_at < utcnow() - timedelta(seconds=older_than))
    )
    return int(getattr(result, "rowcount", 0) or 0)
