"""The running totals behind pixelmill's Prometheus counters and histograms (``metric_totals``).

Each total is added to in the same transaction as what it counts (a job's outcome, a batch's
timings), so the figures hold across processes and hosts, and survive any restart: a
Prometheus counter read from here never goes back. Rows are written in key order, so two
workers adding to the same totals on PostgreSQL wait for each other instead of deadlocking.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, func, select

from pixelmill.db.schema import Batch, Job, JobStatus, JobTally, MetricTotal

TOTALS = cast(Table, MetricTotal.__table__)
ITEMS = "items"  # key: the outcome (done, failed)
# Histograms (keys: ``le=<bound>``, ``sum``, ``count``), written by the workers with the outcomes.
FORWARD_SECONDS = "forward_seconds"  # one observation per forward pass
BATCH_SECONDS = "batch_seconds"  # one per message: from its claim to its outcomes' write
BATCH_SIZE = "batch_size"  # items per forward pass, as the device really ran them

# Histogram buckets (upper bounds), in the metric's base unit.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass(frozen=True)
class Total:
    name: str
    task: str
    model: str
    device: str
    key: str
    value: float


def add_totals(conn: Connection, totals: Iterable[Total]) -> None:
    """Add each total's value to its row (created at 0), in key order."""
    rows: dict[tuple[str, str, str, str, str], float] = {}
    for t in totals:
        k = (t.name, t.task, t.model[:500], t.device or "", t.key)
        rows[k] = rows.get(k, 0.0) + t.value
    if not rows:
        return
    dialect = conn.dialect.name
    # The dialects' INSERTs here, not at import: reading commands (status) never need them.
    from sqlalchemy.dialects import postgresql, sqlite

    stmt: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(TOTALS)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name", "task", "model", "device", "key"],
        set_={"value": TOTALS.c.value + stmt.excluded.value},
    )
    conn.execute(
        stmt,
        [dict(zip(("name", "task", "model", "device", "key"), k, strict=True), value=v)
         for k, v in sorted(rows.items())],
    )  # fmt: skip


def count_outcomes(conn: Connection, job_ids: Collection[str], outcome: str) -> None:
    """``job_ids`` just ended with ``outcome``: add them to the items counter, by task, model
    and device (read from the jobs themselves, in this transaction)."""
    if not job_ids:
        return
    counts: dict[tuple[str, str, str], int] = {}
    ids = list(job_ids)
    for start in range(0, len(ids), 2000):
        for task, model, device, n in conn.execute(
            select(Batch.task, Batch.model, Job.device, func.count())
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.id.in_(ids[start : start + 2000]))
            .group_by(Batch.task, Batch.model, Job.device)
        ):
            key = (task, model, device or "")
            counts[key] = counts.get(key, 0) + n
    add_totals(
        conn, (Total(ITEMS, task, model, device, outcome, n)
               for (task, model, device), n in counts.items())
    )  # fmt: skip


def histogram(
    name: str,
    task: str,
    model: str,
    device: str,
    values: Sequence[float],
    buckets: Sequence[float] = SECONDS_BUCKETS,
) -> list[Total]:
    """The totals that add ``values`` to a histogram: one count per bucket a value falls in
    (the smallest upper bound at or above it; ``le=+Inf`` past the last), ``sum`` and
    ``count``. Cumulative counts are the reader's business."""
    out: list[Total] = []
    for v in values:
        le = next((b for b in buckets if v <= b), math.inf)
        out.append(Total(name, task, model, device, f"le={_bound(le)}", 1))
    if values:
        out.append(Total(name, task, model, device, "sum", float(sum(values))))
        out.append(Total(name, task, model, device, "count", len(values)))
    return out


def _bound(le: float) -> str:
    return "+Inf" if math.isinf(le) else repr(float(le))


def read_totals(conn: Connection) -> list[Total]:
    return [
        Total(r.name, r.task, r.model, r.device, r.key, r.value)
        for r in conn.execute(select(TOTALS))
    ]


# ---- what the metrics exporter reads at scrape time (pixelmill.dashboard.prometheus) -------------


def jobs_by_state(conn: Connection) -> dict[str, int]:
    """Jobs per state, every state present (0 if none): the sums of the tallies
    (``pixelmill.db.tallies``), a few rows per batch however many jobs it has."""
    counts = {str(s): 0 for s in JobStatus}
    for status, n in conn.execute(
        select(JobTally.status, func.sum(JobTally.n))
        .where(JobTally.status.in_(list(counts)))
        .group_by(JobTally.status)
    ):
        counts[str(status)] = int(n)
    return counts


@dataclass(frozen=True)
class Queued:
    """The queued jobs of one priority: how many, and when the oldest batch with queued jobs
    that is not paused was submitted (None: none such)."""

    items: int = 0
    oldest: datetime | None = None


def queued_by_priority(conn: Connection) -> dict[str, Queued]:
    """Queued jobs by their batch's priority (high, normal, low, each present), from each
    batch's tally of queued jobs: the cost follows the number of batches, not of jobs. A paused
    batch's jobs are counted, but its age is not the queue's: it waits for its resume, not for
    a worker."""
    queued = (
        select(func.sum(JobTally.n))
        .where(JobTally.batch_id == Batch.id, JobTally.status == JobStatus.queued.value)
        .scalar_subquery()
    )
    out: dict[str, Queued] = {p: Queued() for p in ("high", "normal", "low")}
    for priority, created_at, paused_at, n in conn.execute(
        select(Batch.priority, Batch.created_at, Batch.paused_at, queued)
    ):
        if not n:
            continue
        key = priority or "normal"
        was = out.get(key, Queued())
        oldest = was.oldest
        if paused_at is None and created_at is not None:
            created = created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)
            oldest = created if oldest is None else min(oldest, created)
        out[key] = Queued(was.items + int(n), oldest)
    return out
