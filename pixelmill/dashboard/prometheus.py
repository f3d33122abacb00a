"""Prometheus metrics: what `pixelmill dashboard` serves at ``/metrics`` (``exposition``).

Nothing is counted in this process: every figure is read at scrape time from the database
(the ``metric_totals`` the workers add to in the transactions that record their outcomes, the
jobs, the workers' own reports) and from Redis (the length of every list a priority queue
uses). So the figures hold across processes and hosts, survive any restart, and any number of
dashboards serve the same ones.

A read is kept ``CACHE_SECONDS`` (longer when it was slow: at most ``MAX_SHARE`` of the
database's time goes to the metrics), so a 1 s scrape interval costs little. A source that is
away (the database, Redis) never fails the scrape: what could be read is exported, with
``pixelmill_up{source}`` 0 and ``pixelmill_scrape_errors_total{source}`` counting it.

Names follow Prometheus' conventions: the ``pixelmill_`` prefix, base units (seconds, bytes),
``_total`` counters, and no batch or job ids as labels (docs/dashboard.md, "Metrics").
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from celery import Celery
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from pixelmill.db.fleet import list_workers
from pixelmill.db.metric_totals import (
    BATCH_SECONDS,
    BATCH_SIZE,
    FORWARD_SECONDS,
    ITEMS,
    SECONDS_BUCKETS,
    SIZE_BUCKETS,
    Queued,
    Total,
    jobs_by_state,
    queued_by_priority,
    read_totals,
)
from pixelmill.db.records import WorkerReport
from pixelmill.settings import Settings
from pixelmill.wire import queue_lengths

log = logging.getLogger(__name__)

PREFIX = "pixelmill_"
CACHE_SECONDS = 2.0  # a read serves the scrapes of this long
MAX_SHARE = 0.05  # a slow read is kept 1/MAX_SHARE times its duration: 5% of a core at most
MAX_CACHE_SECONDS = 60.0  # ... but never longer than this
WAIT_SECONDS = 2.0  # a scrape waits this long for its sources (read in parallel)
WORKER_SEEN_WITHIN = 86400.0  # workers not heard from for a day are left out
DATABASE, REDIS = "database", "redis"

# metric_totals histograms: (their name there, the exported name, help, buckets).
HISTOGRAMS = {
    FORWARD_SECONDS: (
        "pixelmill_forward_seconds",
        "Duration of one forward pass on a device (failed passes included).",
        SECONDS_BUCKETS,
    ),
    BATCH_SECONDS: (
        "pixelmill_batch_seconds",
        "Duration of one message (a model batch of jobs), from its claim to its outcomes' write.",
        SECONDS_BUCKETS,
    ),
    BATCH_SIZE: (
        "pixelmill_batch_size",
        "Items in one forward pass, as the device really ran it.",
        SIZE_BUCKETS,
    ),
}

T = TypeVar("T")


# ---- reading the sources, cached -----------------------------------------------------------


@dataclass
class _Read(Generic[T]):
    value: T | None = None
    error: str | None = None
    finished: float = -math.inf  # monotonic
    seconds: float = 0.0  # how long it took


class _Source(Generic[T]):
    """One source (the database, Redis) read in a thread of its own: a scrape waits for it at
    most until its deadline, and a read still running from an earlier scrape (a hung server)
    is waited for, never started twice. A finished read serves every scrape for
    ``CACHE_SECONDS``, or ``1 / MAX_SHARE`` times its duration if longer (a successful one, up
    to ``MAX_CACHE_SECONDS``)."""

    def __init__(self, name: str, read: Callable[[], T]) -> None:
        self.name = name
        self._read = read
        self._lock = threading.Lock()
        self._last: _Read[T] = _Read()
        self._thread: threading.Thread | None = None

    def _fresh(self, now: float) -> bool:
        last = self._last
        keep = CACHE_SECONDS
        if last.error is None:
            keep = min(max(keep, last.seconds / MAX_SHARE), MAX_CACHE_SECONDS)
        return now - last.finished < keep

    def start(self) -> threading.Thread | None:
        """Start a read unless a recent one serves, or one is running; the thread to wait for."""
        with self._lock:
            if self._fresh(time.monotonic()):
                return None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name=f"metrics-{self.name}", daemon=True
                )
                self._thread.start()
            return self._thread

    def _run(self) -> None:
        started = time.monotonic()
        try:
            read: _Read[T] = _Read(value=self._read())
        except Exception as exc:  # noqa: BLE001 - exported as the source being down
            log.warning("metrics: cannot read the %s: %s", self.name, exc)
            read = _Read(error=f"{type(exc).__name__}: {exc}")
        now = time.monotonic()
        read.finished, read.seconds = now, now - started
        with self._lock:
            self._last = read

    def result(self, since: float) -> _Read[T]:
        """The last finished read if it is fresh or finished after ``since`` (monotonic);
        else an error: the read is still running."""
        with self._lock:
            if self._last.finished >= since or self._fresh(time.monotonic()):
                return self._last
            return _Read(error=f"the {self.name} did not answer within {WAIT_SECONDS:g}s")


def read_sources(*sources: _Source[Any], wait: float = WAIT_SECONDS) -> list[_Read[Any]]:
    """Read the sources in parallel (those not cached), waiting ``wait`` seconds at most."""
    started = time.monotonic()
    deadline = started + wait
    for thread in [s.start() for s in sources]:
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
    return [s.result(started) for s in sources]


@dataclass(frozen=True)
class DatabaseFigures:
    totals: list[Total]
    jobs: dict[str, int]
    queued: dict[str, Queued]
    workers: list[WorkerReport]
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


def read_database(sessions: sessionmaker[Session]) -> DatabaseFigures:
    """Everything the metrics read from the database, in one read-only transaction."""
    with sessions() as session:
        conn = session.connection()
        return DatabaseFigures(
            totals=read_totals(conn),
            jobs=jobs_by_state(conn),
            queued=queued_by_priority(conn),
            workers=list_workers(session, seen_within=WORKER_SEEN_WITHIN),
        )


# ---- the collector -------------------------------------------------------------------------


class PixelmillCollector(Collector):
    """A custom collector: reads the database and Redis at scrape time (cached briefly)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], app: Celery) -> None:
        self.settings = settings
        self.sessions = sessions
        self.app = app
        self.database: _Source[DatabaseFigures] = _Source(DATABASE, lambda: read_database(sessions))
        self.redis: _Source[dict[str, int]] = _Source(
            REDIS, lambda: queue_lengths(app, settings.queue)
        )
        self.errors = {DATABASE: 0, REDIS: 0}
        self._errors_lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        db, redis = read_sources(self.database, self.redis)
        with self._errors_lock:
            for name, read in ((DATABASE, db), (REDIS, redis)):
                if read.error is not None:
                    self.errors[name] += 1
            errors = dict(self.errors)
        up = GaugeMetricFamily(
            "pixelmill_up",
            "Whether the last read of each source the metrics come from succeeded (1) or not.",
            labels=["source"],
        )
        failed = CounterMetricFamily(
            "pixelmill_scrape_errors",
            "Scrapes that could not read a source (its figures were left out).",
            labels=["source"],
        )
        took = GaugeMetricFamily(
            "pixelmill_source_read_seconds",
            "How long the last read of each source took.",
            labels=["source"],
        )
        for name, read in ((DATABASE, db), (REDIS, redis)):
            up.add_metric([name], 0.0 if read.error is not None else 1.0)
            failed.add_metric([name], errors[name])
            if read.error is None:
                took.add_metric([name], read.seconds)
        yield from (up, failed, took)
        if redis.value is not None:
            yield from queue_metrics(self.settings.queue, redis.value)
        if db.value is not None:
            yield from database_metrics(db.value, stale_after=self.settings.lease_seconds)

    def describe(self) -> Iterable[Metric]:
        return []  # no read at registration


def queue_metrics(queue: str, lengths: dict[str, int]) -> Iterator[Metric]:
    messages = GaugeMetricFamily(
        "pixelmill_queue_messages",
        "Messages waiting on the broker, per priority: every Redis list the queue uses (its "
        "priority steps), each summed into its priority. A message holds up to a batch size "
        "of jobs.",
        labels=["queue", "priority"],
    )
    for priority, n in lengths.items():
        messages.add_metric([queue, priority], n)
    yield messages


def database_metrics(figures: DatabaseFigures, *, stale_after: float) -> Iterator[Metric]:
    yield from item_metrics(figures.totals)
    yield from histogram_metrics(figures.totals)
    jobs = GaugeMetricFamily("pixelmill_jobs", "Jobs (images) by state.", labels=["state"])
    for state, n in figures.jobs.items():
        jobs.add_metric([state], n)
    yield jobs
    queued = GaugeMetricFamily(
        "pixelmill_queued_items",
        "Queued jobs (images) by their batch's priority, paused batches included.",
        labels=["priority"],
    )
    oldest = GaugeMetricFamily(
        "pixelmill_oldest_queued_age_seconds",
        "Age of the oldest batch (since its submit) with queued jobs, by priority; paused "
        "batches left out. 0 when none.",
        labels=["priority"],
    )
    for priority, q in figures.queued.items():
        queued.add_metric([priority], q.items)
        age = (figures.now - q.oldest).total_seconds() if q.oldest is not None else 0.0
        oldest.add_metric([priority], max(0.0, age))
    yield from (queued, oldest)
    yield from worker_metrics(figures.workers, figures.now, stale_after=stale_after)


def item_metrics(totals: Iterable[Total]) -> Iterator[Metric]:
    counter = CounterMetricFamily(
        "pixelmill_items_processed",
        "Jobs (images) the workers finished, by task, model, device and outcome (done, "
        "failed). Reused results and cancelled jobs are not processed and not counted.",
        labels=["task", "model", "device", "outcome"],
    )
    counts: dict[tuple[str, str, str], dict[str, float]] = {}
    for t in totals:
        if t.name == ITEMS:
            counts.setdefault((t.task, t.model, t.device), {})[t.key] = t.value
    for (task, model, device), by_outcome in sorted(counts.items()):
        for outcome in sorted({"done", "failed", *by_outcome}):  # both, from the start
            counter.add_metric([task, model, device, outcome], by_outcome.get(outcome, 0.0))
    yield counter


def histogram_metrics(totals: Iterable[Total]) -> Iterator[Metric]:
    """The histograms, their cumulative buckets built from the stored per-bucket counts (each
    value counted once, in the smallest bucket it fits). Every standard bound is exported,
    and any other stored one (buckets changed since)."""
    stored: dict[str, dict[tuple[str, str, str], dict[str, float]]] = {}
    for t in totals:
        if t.name in HISTOGRAMS:
            stored.setdefault(t.name, {}).setdefault((t.task, t.model, t.device), {})[t.key] = (
                t.value
            )
    for name, (exported, help_, standard) in HISTOGRAMS.items():
        family = HistogramMetricFamily(exported, help_, labels=["task", "model", "device"])
        for labels, keys in sorted(stored.get(name, {}).items()):
            family.add_metric(list(labels), cumulative(keys, standard), keys.get("sum", 0.0))
        yield family


def cumulative(keys: dict[str, float], standard: Iterable[float]) -> list[tuple[str, float]]:
    """``le=<bound>`` counts (non-cumulative) -> Prometheus' cumulative buckets, +Inf last."""
    counts: dict[float, float] = {}
    for key, value in keys.items():
        if key.startswith("le="):
            try:
                bound = float(key[3:])
            except ValueError:
                continue
            counts[bound] = counts.get(bound, 0.0) + value
    bounds = sorted({float(b) for b in standard} | {b for b in counts if not math.isinf(b)})
    out: list[tuple[str, float]] = []
    running = 0.0
    for bound in bounds:
        running += counts.get(bound, 0.0)
        out.append((repr(bound), running))
    out.append(("+Inf", running + counts.get(math.inf, 0.0)))
    return out


def worker_metrics(
    workers: Iterable[WorkerReport], now: datetime, *, stale_after: float
) -> Iterator[Metric]:
    labels = ["worker", "host", "device"]
    age = GaugeMetricFamily(
        "pixelmill_worker_heartbeat_age_seconds",
        "Seconds since each device worker process last reported (every heartbeat: a quarter "
        "of PIXELMILL_LEASE_SECONDS). Workers not heard from for a day are left out.",
        labels=labels,
    )
    up = GaugeMetricFamily(
        "pixelmill_worker_up",
        "1 while a device worker reports (within PIXELMILL_LEASE_SECONDS) and has not stopped.",
        labels=labels,
    )
    busy = GaugeMetricFamily(
        "pixelmill_worker_busy",
        "1 while a device worker has a message in progress, at its last report.",
        labels=labels,
    )
    items = CounterMetricFamily(
        "pixelmill_worker_items_processed",
        "Jobs a device worker process finished since it started (resets when it restarts; "
        "pixelmill_items_processed_total never does).",
        labels=labels,
    )
    used = GaugeMetricFamily(
        "pixelmill_device_memory_used_bytes",
        "GPU memory the worker's tensors hold (torch.cuda.memory_allocated).",
        labels=labels,
    )
    total = GaugeMetricFamily(
        "pixelmill_device_memory_total_bytes", "The GPU's memory.", labels=labels
    )
    utilization = GaugeMetricFamily(
        "pixelmill_gpu_utilization_ratio",
        "Fraction of the last sample period the GPU was busy (NVML), where nvidia-ml-py is "
        "installed.",
        labels=labels,
    )
    for w in workers:
        values = [w.name, w.host, w.device]
        seconds = (now - w.heartbeat_at).total_seconds() if w.heartbeat_at else math.inf
        age.add_metric(values, max(0.0, seconds))
        alive = w.state != "stopped" and seconds <= stale_after
        up.add_metric(values, 1.0 if alive else 0.0)
        busy.add_metric(values, 1.0 if alive and w.state == "busy" else 0.0)
        items.add_metric(values, w.items)
        if w.memory_used is not None:
            used.add_metric(values, w.memory_used)
        if w.memory_total is not None:
            total.add_metric(values, w.memory_total)
        if w.utilization is not None:
            utilization.add_metric(values, w.utilization)
    yield from (age, up, busy, items, used, total, utilization)


# ---- the entry point -------------------------------------------------------------------------

_REGISTRIES: dict[tuple[int, int, str], tuple[CollectorRegistry, PixelmillCollector]] = {}
_REGISTRIES_LOCK = threading.Lock()
MAX_REGISTRIES = 8


def registry_for(
    settings: Settings, sessions: sessionmaker[Session], app: Celery
) -> CollectorRegistry:
    """One registry (and its cache) per database and broker the caller serves: the same one at
    every scrape. The collector holds ``sessions`` and ``app``, so their ids stay theirs."""
    key = (id(sessions), id(app), settings.queue)
    with _REGISTRIES_LOCK:
        found = _REGISTRIES.get(key)
        if found is None:
            registry = CollectorRegistry(auto_describe=False)
            collector = PixelmillCollector(settings, sessions, app)
            registry.register(collector)
            while len(_REGISTRIES) >= MAX_REGISTRIES:
                del _REGISTRIES[next(iter(_REGISTRIES))]
            found = _REGISTRIES[key] = (registry, collector)
        return found[0]


def exposition(
    settings: Settings, sessions: sessionmaker[Session], app: Celery
) -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` response (Prometheus' text format). Blocks
    for the database and Redis reads (``WAIT_SECONDS`` at most): call it off an event loop."""
    return generate_latest(registry_for(settings, sessions, app)), CONTENT_TYPE_LATEST
