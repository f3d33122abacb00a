"""One batch of jobs, from ids to committed outcomes. Plain functions, tested without Celery.

Stages: claim (db) -> decode + preprocess (thread pool, overlaps the other batch's forward)
-> forward on the device (one batch, under the device lock) -> images encoded and stored in the
object store (thread pool), each under its job's deterministic key -> write outcomes and the
artifact rows that name the stored objects (one transaction).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, PngImagePlugin
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import (
    ArtifactRecord,
    BatchInfo,
    ClaimedJob,
    Outcome,
    claim_jobs,
    write_outcomes,
)
from db.store import ObjectStore, StoreError, artifact_key
from models.base import IMAGE, Runner
from models.cache import ModelCache
from pixelmill.catalog import job_path
from pixelmill.errors import BadInput, ModelUnavailable

log = logging.getLogger(__name__)


class SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode; exclusive waiters go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class WorkerContext:
    """What one device process shares between its batches: created once, after start."""

    sessions: sessionmaker[Session]
    cache: ModelCache
    device_label: str
    worker_name: str
    store: ObjectStore | None = None
    decode_threads: int = 2
    device_batch: int | None = None  # largest forward pass; None: the whole message
    lease: float = 60  # seconds a claimed job is ours; the heartbeat renews it
    max_attempts: int | None = None  # starts before a job whose worker keeps dying fails
    device_lock: threading.Lock = field(default_factory=threading.Lock)
    isolation: SharedExclusiveLock = field(default_factory=lambda: SharedExclusiveLock())
    # Batches' task, model and options (they never change), so a claim is one statement.
    batches: dict[str, BatchInfo] = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class BatchReport:
    claimed: int
    done: int
    failed: int
    seconds: float


MAX_KNOWN_BATCHES = 1024


class _Suspect(Exception):
    """Raised inside the claim's transaction to undo it: a job was started before."""


def process_batch(ctx: WorkerContext, job_ids: Sequence[str]) -> BatchReport:
    """Claim, run and record one message's jobs. A message holding a job that was started
    before and never finished (its worker died: maybe this job killed it) runs alone in this
    process, so that if it kills this one too, no other job dies with it. The claim is what
    finds such a job: it is undone and taken again once this process runs nothing else, so an
    attempt is only counted when the job runs alone."""
    try:
        with ctx.isolation.shared():
            return _process(ctx, job_ids, alone=False)
    except _Suspect:
        with ctx.isolation.exclusive():
            return _process(ctx, job_ids, alone=True)


def _process(ctx: WorkerContext, job_ids: Sequence[str], *, alone: bool) -> BatchReport:
    started = time.perf_counter()
    if len(ctx.batches) > MAX_KNOWN_BATCHES:
        ctx.batches.clear()
    with ctx.sessions.begin() as session:
        claimed = claim_jobs(
            session,
            list(job_ids),
            worker=ctx.worker_name,
            device=ctx.device_label,
            lease=ctx.lease,
            max_attempts=ctx.max_attempts,
            batches=ctx.batches,
        )
        if not alone and any(job.attempts > 1 for job in claimed):
            raise _Suspect  # rolls the claim back
    if not claimed:
        return BatchReport(0, 0, 0, time.perf_counter() - started)
    outcomes: list[Outcome] = []
    for jobs in _by_batch(claimed):
        outcomes.extend(_run_group(ctx, task=jobs[0].task, model=jobs[0].model, jobs=jobs))
    with ctx.sessions.begin() as session:
        write_outcomes(session, outcomes)
    failed = sum(1 for o in outcomes if o.error is not None)
    return BatchReport(len(claimed), len(outcomes) - failed, failed, time.perf_counter() - started)


def _by_batch(jobs: list[ClaimedJob]) -> list[list[ClaimedJob]]:
    """Jobs that can share one forward pass: those of one batch (one task, model and options)."""
    groups: dict[str, list[ClaimedJob]] = {}
    for job in jobs:
        groups.setdefault(job.batch_id, []).append(job)
    return list(groups.values())


def _run_group(
    ctx: WorkerContext, *, task: str, model: str, jobs: list[ClaimedJob]
) -> list[Outcome]:
    def failed(job: ClaimedJob, reason: str, runner: Runner | None = None) -> Outcome:
        return Outcome(
            job_id=job.job_id,
            error=reason,
            model=model,
            model_revision=runner.revision if runner else None,
            device=ctx.device_label,
        )

    try:
        runner = ctx.cache.get(task, model)
    except ModelUnavailable as exc:
        log.warning("%s", exc)
        return [failed(job, str(exc)) for job in jobs]

    options = jobs[0].options
    # Decoding is queued for the whole message at once, in order; each forward pass starts as
    # soon as its own items are ready (the first pass does not wait for the last decode).
    pending = [(job, ctx.pool.submit(_prepare, runner, job)) for job in jobs]
    outcomes: dict[str, Outcome] = {}

    def ready_items(chunk: list[tuple[ClaimedJob, Future[Any]]]) -> list[tuple[ClaimedJob, Any]]:
        ready = []
        for job, future in chunk:
            item = future.result()
            if isinstance(item, _Unusable):
                outcomes[job.job_id] = failed(job, item.reason)
            else:
                ready.append((job, item))
        return ready

    finished = _forward_isolating_failures(ctx, runner, pending, ready_items, options)
    stored: list[tuple[ArtifactRecord, ...]] = [()] * len(finished)
    if any(isinstance(res, dict) and IMAGE in res for _, res in finished):
        stored = list(ctx.pool.map(lambda pair: _store_images(ctx, runner, *pair), finished))
    for (job, res), artifacts in zip(finished, stored, strict=True):
        if isinstance(res, BaseException):
            outcomes[job.job_id] = failed(job, f"{job.input}: model failed: {res}", runner)
        else:
            outcomes[job.job_id] = Outcome(
                job_id=job.job_id,
                result=res,
                model=model,
                model_revision=runner.revision,
                device=ctx.device_label,
                artifacts=artifacts,
            )
    return [outcomes[job.job_id] for job in jobs]


def _store_images(
    ctx: WorkerContext, runner: Runner, job: ClaimedJob, res: dict[str, Any] | BaseException
) -> tuple[ArtifactRecord, ...]:
    """Move a result's image to the object store under the job's deterministic key (a retry
    overwrites the same object) and return the record that names it."""
    if isinstance(res, BaseException) or not isinstance(res.get(IMAGE), Image.Image):
        return ()
    image: Image.Image = res.pop(IMAGE)
    if ctx.store is None:
        raise StoreError("this worker has no object store configured for artifacts")
    provenance = {
        "model": runner.name,
        "model_revision": runner.revision,
        "device": ctx.device_label,
        "precision": runner.precision,
        **{k: v for k, v in res.items() if isinstance(v, str | int | float)},
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("pixelmill", json.dumps(provenance, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    key = artifact_key(batch_id=job.batch_id, job_id=job.job_id)
    obj = ctx.store.put(key, buf.getvalue(), content_type="image/png")  # StoreError: retried
    return (
        ArtifactRecord(
            key=obj.key,
            uri=obj.uri,
            content_type=obj.content_type,
            size=obj.size,
            sha256=obj.sha256,
            width=image.width,
            height=image.height,
            seed=res.get("seed"),
            steps=res.get("steps"),
            precision=runner.precision,
        ),
    )


@dataclass(frozen=True)
class _Unusable:
    reason: str


def _prepare(runner: Runner, job: ClaimedJob) -> Any:
    """Decode and preprocess one input; a bad input becomes an _Unusable naming the file."""
    try:
        return runner.prepare(job_path(job.input, job.params), job.params, job.options)
    except (BadInput, ModelUnavailable) as exc:
        return _Unusable(str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoder bug fails this one job only
        log.exception("unexpected error preparing %s", job.input)
        return _Unusable(f"{job.input}: cannot prepare image ({type(exc).__name__}: {exc})")


def _forward_isolating_failures(
    ctx: WorkerContext,
    runner: Runner,
    pending: list[tuple[ClaimedJob, Future[Any]]],
    ready_items: Callable[[list[tuple[ClaimedJob, Future[Any]]]], list[tuple[ClaimedJob, Any]]],
    options: dict[str, Any],
) -> list[tuple[ClaimedJob, dict[str, Any] | BaseException]]:
    """Run the message in forward passes of the device's size, each as soon as its items are
    decoded; if a pass raises, split it in halves down to single items, so that only an item
    that fails alone fails (out-of-memory on a large batch, one poisonous input).

    The device is held for the whole message, not per pass: the message that got there first
    finishes first (and is acked), while the next one decodes. Interleaving their passes would
    delay both, and leave a worker idle at the end of a run while another finishes two."""

    def forward(chunk: list[Any]) -> list[dict[str, Any]]:
        try:
            return runner.run(chunk, options)
        except Exception as exc:
            ctx.cache.relieve(exc, keep=runner)
            raise

    size = ctx.device_batch or len(pending)
    results: list[tuple[ClaimedJob, dict[str, Any] | BaseException]] = []
    with ctx.device_lock:
        for start in range(0, len(pending), size):
            ready = ready_items(pending[start : start + size])
            if ready:
                out = _split_on_error(forward, [item for _, item in ready])
                results.extend(zip([job for job, _ in ready], out, strict=True))
    return results


def _split_on_error(
    fn: Callable[[list[Any]], list[dict[str, Any]]], items: list[Any]
) -> list[dict[str, Any] | BaseException]:
    try:
        return list(fn(items))
    except Exception as exc:  # noqa: BLE001
        if len(items) == 1:
            log.warning("model failed on one item: %s", exc)
            return [exc]
        log.warning("batch of %d failed (%s); splitting", len(items), exc)
        mid = len(items) // 2
        return _split_on_error(fn, items[:mid]) + _split_on_error(fn, items[mid:])
