"""One batch of jobs, from ids to committed outcomes. Plain functions, tested without Celery.

Stages: claim (db) -> decode + preprocess (thread pool, overlaps the other batch's forward)
-> forward on the device (one batch, under the device lock) -> images encoded and stored in the
object store (thread pool), each under its job's deterministic key -> write outcomes and the
artifact rows that name the stored objects (one transaction).

Unattended runs never hang and never orphan a job (docs/guarantees.md):
- the claimed jobs are tracked while the batch works on them, and each stage stamps progress;
  the heartbeat renews only those (``pixelmill.worker.heartbeat``);
- each input's read and decode has a deadline (``PIXELMILL_READ_TIMEOUT``); a stuck thread is
  abandoned and replaced (``pixelmill.deadlines``);
- a transient error (the database or the object store away) is retried here, in place, with
  capped backoff for ``PIXELMILL_TRANSIENT_RETRY_SECONDS``, without claiming again (attempts
  count worker deaths only); then the jobs fail with the real reason;
- any other error fails the jobs it hit, with its message; only when even that cannot be
  written (the database still away) are the jobs left to the reconciler.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from pixelmill.catalog import STORED_INPUT, job_path
from pixelmill.db.content_index import record_revision
from pixelmill.db.embeddings import to_bytes
from pixelmill.db.jobs import claim_jobs, fail_jobs, write_outcomes
from pixelmill.db.metric_totals import (
    BATCH_SECONDS,
    BATCH_SIZE,
    FORWARD_SECONDS,
    SIZE_BUCKETS,
    Total,
    histogram,
)
from pixelmill.db.records import ArtifactRecord, BatchInfo, ClaimedJob, ContentSeen, Outcome
from pixelmill.db.sources import S3Inputs, is_remote
from pixelmill.db.store import ObjectStore, artifact_key
from pixelmill.db.window import Window, top_up
from pixelmill.deadlines import DeadlineExceeded, DecodePool
from pixelmill.errors import (
    BadInput,
    ModelUnavailable,
    PixelmillError,
    ServiceUnavailable,
    StoreError,
)
from pixelmill.models.artifacts import encode_png, provenance
from pixelmill.models.base import IMAGE, Runner
from pixelmill.models.cache import ModelCache
from pixelmill.models.clip import EMBEDDING
from pixelmill.models.images import Fetched, open_input
from pixelmill.models.registry import runner_kind
from pixelmill.settings import Settings
from pixelmill.tasks import TaskOptions, task_options
from pixelmill.worker.heartbeat import Activity, InProgress, Tracked
from pixelmill.worker.retrying import GaveUp, Retrier, first_line

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
    # Each claim sends its batches' next messages (``pixelmill.db.window``): PIXELMILL_WINDOW,
    # the new messages' queued lease, and how they are sent (set with the Celery app; None:
    # no top-up, a caller that enqueues every job itself).
    window: int = 4
    queued_lease: float = 600
    send: Callable[[Window], None] | None = None
    read_timeout: float = 60  # seconds one input's read + decode + preprocess may take
    stall: float = 1800  # a batch without progress this long is no longer renewed
    transient_retry: float = 900  # seconds a transient error is retried in place
    device_lock: threading.Lock = field(default_factory=threading.Lock)
    isolation: SharedExclusiveLock = field(default_factory=lambda: SharedExclusiveLock())
    # Batches' task, model and options (they never change), so a claim is one statement, and
    # their options validated into typed objects once per batch, not per message or item.
    batches: dict[str, BatchInfo] = field(default_factory=dict)
    typed_options: dict[str, TaskOptions] = field(default_factory=dict)
    # The batches in progress, whose jobs the heartbeat renews.
    progress: InProgress = field(default_factory=InProgress)
    device_holder: Tracked | None = None  # the batch on the device now
    activity: Activity = field(default_factory=Activity)  # items finished, for the reports
    # (task, model, revision) this process recorded as the models' current revisions.
    recorded: set[tuple[str, str, str]] = field(default_factory=set)
    # Where s3:// inputs come from (made on first use, from the settings' S3 endpoint).
    settings: Settings | None = None
    max_fetch_bytes: int | None = None  # an object larger than this fails its job
    _remote: S3Inputs | None = None
    _remote_lock: threading.Lock = field(default_factory=threading.Lock)
    _fetch_pool: ThreadPoolExecutor | None = None
    _pool: DecodePool | None = None

    @property
    def remote(self) -> S3Inputs:
        with self._remote_lock:
            if self._remote is None:
                self._remote = S3Inputs(self.settings)
            return self._remote

    def fetch(self, job: ClaimedJob) -> Future[Any] | None:
        """Start fetching ``job``'s input if it is an s3:// object (None for a file): the
        message's objects are all requested at once, on I/O threads of their own, so the
        decode threads find them there instead of waiting for each in turn."""
        uri = job_path(job.input, job.params)
        if STORED_INPUT in job.params or not is_remote(uri):
            return None
        with self._remote_lock:
            if self._fetch_pool is None:
                self._fetch_pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="fetch")
            pool = self._fetch_pool
        return pool.submit(lambda: self.remote.fetch(uri, max_bytes=self.max_fetch_bytes))

    @property
    def pool(self) -> DecodePool:
        if self._pool is None:
            self._pool = DecodePool(self.decode_threads, name="decode")
        return self._pool

    def remember(self, claimed: Sequence[ClaimedJob]) -> None:
        """Keep the batches of ``claimed`` for the next claims (at most MAX_KNOWN_BATCHES)."""
        if len(self.batches) > MAX_KNOWN_BATCHES:
            self.batches.clear()
            self.typed_options.clear()
        for job in claimed:
            self.batches.setdefault(job.batch_id, job.batch)

    def options(self, job: ClaimedJob) -> TaskOptions:
        """The typed options of ``job``'s batch, validated the first time the batch is seen;
        ``BadInput`` naming the bad option."""
        options = self.typed_options.get(job.batch_id)
        if options is None:
            info = job.batch
            options = task_options(info.task, info.options, info.model)
            self.typed_options[job.batch_id] = options
        return options

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._fetch_pool is not None:
            self._fetch_pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class BatchReport:
    claimed: int
    done: int
    failed: int
    seconds: float


MAX_KNOWN_BATCHES = 1024
FETCH_THREADS = 8  # s3:// objects in flight per worker process
# The largest input held in memory (read and hashed, or fetched): a larger file is decoded
# from its path and never reused; a larger object fails its job ("object too large").
MAX_INPUT_BYTES = 512 << 20


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
            report = _process(ctx, job_ids, alone=False)
    except _Suspect:
        with ctx.isolation.exclusive():
            report = _process(ctx, job_ids, alone=True)
    ctx.activity.finished(report.done + report.failed)
    return report


@dataclass
class _Timings:
    """A message's forward passes (items, seconds) by task and model: added to the metrics'
    histograms (``pixelmill.db.metric_totals``) in the transaction that records its outcomes."""

    passes: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)

    def group(self, task: str, model: str) -> list[tuple[int, float]]:
        return self.passes.setdefault((task, model), [])

    def totals(self, device: str, seconds: float) -> list[Total]:
        """The histograms' totals: each pass's duration and size, and the message's duration
        (claim to write) once per task and model it held (nearly always one)."""
        out: list[Total] = []
        for (task, model), passes in self.passes.items():
            out += histogram(FORWARD_SECONDS, task, model, device, [t for _, t in passes])
            out += histogram(BATCH_SIZE, task, model, device, [n for n, _ in passes],
                             SIZE_BUCKETS)  # fmt: skip
            out += histogram(BATCH_SECONDS, task, model, device, [seconds])
        return out


def _process(ctx: WorkerContext, job_ids: Sequence[str], *, alone: bool) -> BatchReport:
    started = time.perf_counter()
    retry = Retrier(ctx.transient_retry)

    def claim() -> tuple[list[ClaimedJob], list[Window]]:
        with ctx.sessions.begin() as session:
            claimed = claim_jobs(
                session,
                list(job_ids),
                worker=ctx.worker_name,
                device=ctx.device_label,
                lease=ctx.lease,
                max_attempts=ctx.max_attempts,
                known=ctx.batches,
            )
            if not alone and any(job.attempts > 1 for job in claimed):
                raise _Suspect  # rolls the claim back
            if ctx.send is None or not claimed:
                return claimed, []
            # In the claim's transaction: the next messages are never lost (once committed,
            # the reconciler sends them if this process dies before it does) nor doubled.
            batches = {job.batch_id for job in claimed}
            return claimed, top_up(session, batches, window=ctx.window, lease=ctx.queued_lease)

    try:
        claimed, windows = retry.call(claim)
    except GaveUp as exc:  # nothing claimed: the jobs are still queued, for the reconciler
        raise ServiceUnavailable(f"cannot claim jobs: {exc}") from exc
    _send(ctx, windows)
    ctx.remember(claimed)
    if not claimed:
        return BatchReport(0, 0, 0, time.perf_counter() - started)
    timings = _Timings()
    with ctx.progress.track([job.job_id for job in claimed], claimed[0].batch_id) as tracked:
        retry.tracked = tracked
        try:
            outcomes: list[Outcome] = []
            for jobs in _by_batch(claimed):
                try:
                    outcomes.extend(_run_group(ctx, tracked, retry, jobs=jobs, timings=timings))
                except Exception as exc:  # noqa: BLE001 - fails this group's jobs, with why
                    log.exception("batch of %d on %s failed", len(jobs), jobs[0].model)
                    outcomes.extend(_group_failed(ctx, jobs, exc))
            totals = timings.totals(ctx.device_label, time.perf_counter() - started)
            outcomes = _write(ctx, retry, claimed, outcomes, totals)
        except Exception as exc:  # noqa: BLE001 - never leave the claimed jobs running
            return _fail_claimed(ctx, retry, claimed, exc, started)
    failed = sum(1 for o in outcomes if o.error is not None)
    return BatchReport(len(claimed), len(outcomes) - failed, failed, time.perf_counter() - started)


def _send(ctx: WorkerContext, windows: list[Window]) -> None:
    """Send the batches' next messages. One the broker does not take now is not lost: its
    jobs are leased in their batch's window, and the reconciler sends them again once the
    lease runs out (``pixelmill.worker.reconciler``)."""
    send = ctx.send
    if send is None:  # no top-up here (claim() returned none): nothing to send
        return
    for window in windows:
        try:
            send(window)
        except Exception as exc:  # noqa: BLE001 - the broker away: the reconciler's to send
            log.warning(
                "cannot send the next %d job(s) of batch %s (%s); the reconciler sends them "
                "once their lease runs out", len(window.job_ids), window.batch_id, exc,
            )  # fmt: skip


# ---- recording outcomes ------------------------------------------------------------------


def _write(
    ctx: WorkerContext,
    retry: Retrier,
    claimed: list[ClaimedJob],
    outcomes: list[Outcome],
    totals: Sequence[Total] = (),
) -> list[Outcome]:
    """Record the outcomes in one transaction (with the message's timings, ``totals``),
    retrying transient errors. A non-transient error (a value the database refuses) falls back
    to one transaction per outcome, so only an outcome that cannot be recorded fails, with why;
    the timings then go alone. Returns the outcomes as recorded."""

    def write(batch: list[Outcome], totals: Sequence[Total] = ()) -> None:
        with ctx.sessions.begin() as session:
            write_outcomes(session, batch, totals)

    try:
        retry.call(write, outcomes, totals)
        return outcomes
    except GaveUp:
        raise
    except Exception as exc:  # noqa: BLE001 - one outcome the database refuses
        log.warning("writing %d outcomes failed (%s); one by one", len(outcomes), exc)
    inputs = {job.job_id: job.input for job in claimed}
    recorded = []
    for outcome in outcomes:
        try:
            retry.call(write, [outcome])
        except GaveUp:
            raise
        except Exception as exc:  # noqa: BLE001
            outcome = _unrecordable(ctx, retry, outcome, inputs[outcome.job_id], exc)
        recorded.append(outcome)
    try:
        retry.call(write, [], totals)
    except Exception:  # noqa: BLE001 - only the metrics' timings are lost
        log.warning("cannot record the batch's timings", exc_info=True)
    return recorded


def _unrecordable(
    ctx: WorkerContext, retry: Retrier, outcome: Outcome, input: str, exc: BaseException
) -> Outcome:
    """Fail a job whose outcome the database refuses, with why (or, if even that reason is
    refused, a plain one)."""
    reason = f"{input}: cannot record the result (database: {first_line(exc)})"
    log.warning("%s", reason)
    try:
        _fail(ctx, retry, [outcome.job_id], reason)
    except GaveUp:
        raise
    except Exception:  # noqa: BLE001 - not even the reason: a plain one
        log.exception("cannot record the failure of %s", outcome.job_id)
        reason = f"{input}: cannot record the result in the database"
        _fail(ctx, retry, [outcome.job_id], reason)
    return Outcome(job_id=outcome.job_id, error=reason, model=outcome.model, device=outcome.device)


def _fail(ctx: WorkerContext, retry: Retrier, job_ids: list[str], reason: str) -> list[str]:
    def fail() -> list[str]:
        with ctx.sessions.begin() as session:
            return fail_jobs(
                session, job_ids, reason=reason, worker=ctx.worker_name, device=ctx.device_label
            )

    result: list[str] = retry.call(fail)
    return result


def _fail_claimed(
    ctx: WorkerContext,
    retry: Retrier,
    claimed: list[ClaimedJob],
    exc: BaseException,
    started: float,
) -> BatchReport:
    """The batch cannot finish: its jobs still running fail with the reason. If even that
    cannot be written, they are left to the reconciler (no longer renewed, their lease
    lapses) and ``ServiceUnavailable`` says so."""
    if isinstance(exc, GaveUp):
        reason = str(exc)
    else:
        log.error("batch of %d failed", len(claimed), exc_info=exc)
        reason = f"unexpected error: {type(exc).__name__}: {first_line(exc)}"
    try:
        moved = _fail(ctx, retry, [job.job_id for job in claimed], reason)
    except Exception as again:  # noqa: BLE001
        raise ServiceUnavailable(
            f"{reason}; the batch's {len(claimed)} jobs are left to the reconciler "
            f"(cannot record their failure: {first_line(again)})"
        ) from exc
    return BatchReport(len(claimed), 0, len(moved), time.perf_counter() - started)


# ---- one group: load, decode, forward, store -----------------------------------------------


def _by_batch(jobs: list[ClaimedJob]) -> list[list[ClaimedJob]]:
    """Jobs that can share one forward pass: those of one batch (one task, model and options)."""
    groups: dict[str, list[ClaimedJob]] = {}
    for job in jobs:
        groups.setdefault(job.batch_id, []).append(job)
    return list(groups.values())


def _group_failed(ctx: WorkerContext, jobs: list[ClaimedJob], exc: BaseException) -> list[Outcome]:
    """Every job of a group that raised, failed with the error's message (and the model)."""
    model = jobs[0].model
    if isinstance(exc, GaveUp | ModelUnavailable):
        why = str(exc)
    else:
        why = f"unexpected error with model {model!r}: {type(exc).__name__}: {first_line(exc)}"
    return [
        Outcome(
            job_id=job.job_id, error=f"{job.input}: {why}", model=model, device=ctx.device_label
        )
        for job in jobs
    ]


def _run_group(
    ctx: WorkerContext,
    tracked: Tracked,
    retry: Retrier,
    *,
    jobs: list[ClaimedJob],
    timings: _Timings | None = None,
) -> list[Outcome]:
    """One message's jobs of one batch: the model loaded, every input decoded (each with its
    deadline), the forward passes (a failing one split until only its poisonous item fails),
    the images stored, one outcome per job."""
    task, model = jobs[0].task, jobs[0].model
    passes = (timings or _Timings()).group(task, model)
    loaded = _load_runner(ctx, retry, tracked, jobs)
    if isinstance(loaded, list):
        return loaded
    runner, options = loaded
    seen: dict[str, ContentSeen] = {}  # what fetching s3:// inputs taught us
    outcomes: dict[str, Outcome] = {}

    def ready_items(chunk: list[tuple[ClaimedJob, Future[Any]]]) -> list[tuple[ClaimedJob, Any]]:
        return _ready_items(ctx, chunk, outcomes)

    pending = _decode_all(ctx, runner, jobs, options, tracked, seen)
    finished = _forward_isolating_failures(
        ctx, tracked, runner, pending, ready_items, options, passes
    )
    outcomes.update(_outcomes(ctx, tracked, retry, runner, finished, seen))
    return [outcomes[job.job_id] for job in jobs]


def _failed(
    ctx: WorkerContext, job: ClaimedJob, reason: str, runner: Runner[Any] | None = None
) -> Outcome:
    return Outcome(
        job_id=job.job_id,
        error=reason,
        model=job.model,
        model_revision=runner.revision if runner else None,
        device=ctx.device_label,
    )


def _load_runner(
    ctx: WorkerContext, retry: Retrier, tracked: Tracked, jobs: list[ClaimedJob]
) -> tuple[Runner[Any], TaskOptions] | list[Outcome]:
    """The batch's options, validated once for all its jobs (before a load they would waste),
    and its model, loaded; else every job failed, with why."""
    task, model = jobs[0].task, jobs[0].model
    try:
        options = ctx.options(jobs[0])
    except BadInput as exc:
        log.warning("%s", exc)
        return [_failed(ctx, job, f"{job.input}: {exc}") for job in jobs]
    try:
        runner = ctx.cache.get(runner_kind(task, options), model)
    except ModelUnavailable as exc:
        log.warning("%s", exc)
        return [_failed(ctx, job, str(exc)) for job in jobs]
    tracked.touch()
    _record_revision(ctx, retry, task, model, runner.revision)
    return runner, options


def _decode_all(
    ctx: WorkerContext,
    runner: Runner[Any],
    jobs: list[ClaimedJob],
    options: TaskOptions,
    tracked: Tracked,
    seen: dict[str, ContentSeen],
) -> list[tuple[ClaimedJob, Future[Any]]]:
    """Decoding queued for the whole message at once, in order; each forward pass starts as
    soon as its own items are ready (the first pass does not wait for the last decode). Each
    input has its deadline: a read that hangs fails its job, not the batch."""
    fetches = [ctx.fetch(job) for job in jobs]
    return [
        (job, ctx.pool.submit(_prepare, ctx, runner, job, options, tracked, seen, fetch,
                              deadline=ctx.read_timeout))
        for job, fetch in zip(jobs, fetches, strict=True)
    ]  # fmt: skip


def _ready_items(
    ctx: WorkerContext,
    chunk: list[tuple[ClaimedJob, Future[Any]]],
    outcomes: dict[str, Outcome],
) -> list[tuple[ClaimedJob, Any]]:
    """The decoded items of ``chunk``, waited for; a job whose input could not be used (or
    whose read passed its deadline) gets its failed outcome instead."""
    ready = []
    for job, future in chunk:
        try:
            item = future.result()
        except DeadlineExceeded as exc:
            log.error("%s: abandoned after %gs (a hung read?)", job.input, exc.seconds)
            item = _Unusable(
                f"{job.input}: reading or decoding took longer than {exc.seconds:g} s "
                "(a hung file system?)"
            )
        if isinstance(item, _Unusable):
            outcomes[job.job_id] = _failed(ctx, job, item.reason)
        else:
            ready.append((job, item))
    return ready


def _outcomes(
    ctx: WorkerContext,
    tracked: Tracked,
    retry: Retrier,
    runner: Runner[Any],
    finished: list[tuple[ClaimedJob, Any]],
    seen: dict[str, ContentSeen],
) -> dict[str, Outcome]:
    """Each forwarded job's outcome: its images stored first (in the decode pool), its
    embedding as bytes; a failed forward or store fails that job only."""
    stores: list[Future[Any] | None] = [None] * len(finished)
    if any(isinstance(res, dict) and IMAGE in res for _, res in finished):
        stores = [
            ctx.pool.submit(_store_images, ctx, tracked, retry, runner, job, res)
            for job, res in finished
        ]
    outcomes: dict[str, Outcome] = {}
    for (job, res), store in zip(finished, stores, strict=True):
        if isinstance(res, BaseException):
            outcomes[job.job_id] = _failed(ctx, job, f"{job.input}: model failed: {res}", runner)
            continue
        try:
            artifacts = store.result() if store is not None else ()
        except GaveUp as exc:  # the object store away for longer than the retry window
            outcomes[job.job_id] = _failed(ctx, job, str(exc), runner)
            continue
        except Exception as exc:  # noqa: BLE001 - encoding or storing failed: this job only
            log.warning("%s: cannot store the image", job.input, exc_info=exc)
            reason = f"{job.input}: cannot store the image ({type(exc).__name__}: {exc})"
            outcomes[job.job_id] = _failed(ctx, job, reason, runner)
            continue
        vector = res.pop(EMBEDDING, None)
        outcomes[job.job_id] = Outcome(
            job_id=job.job_id,
            result=res,
            model=job.model,
            model_revision=runner.revision,
            device=ctx.device_label,
            artifacts=artifacts,
            content=seen.get(job.job_id),
            embedding=to_bytes(vector) if vector is not None else None,
        )
    return outcomes


def _store_images(
    ctx: WorkerContext,
    tracked: Tracked,
    retry: Retrier,
    runner: Runner[Any],
    job: ClaimedJob,
    res: dict[str, Any] | BaseException,
) -> tuple[ArtifactRecord, ...]:
    """Move a result's image to the object store under the job's deterministic key (a retry
    overwrites the same object) and return the record that names it. A store error is retried
    in place (``retry``); past its window it raises ``GaveUp``."""
    if isinstance(res, BaseException) or not isinstance(res.get(IMAGE), Image.Image):
        return ()
    image: Image.Image = res.pop(IMAGE)
    store = ctx.store
    if store is None:
        raise PixelmillError("this worker has no object store configured for artifacts")
    data = encode_png(image, provenance(runner, ctx.device_label, res))
    key = artifact_key(batch_id=job.batch_id, job_id=job.job_id)
    obj = retry.call(lambda: store.put(key, data, content_type="image/png"))
    tracked.touch()
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


def _record_revision(
    ctx: WorkerContext, retry: Retrier, task: str, model: str, revision: str | None
) -> None:
    """Say, once per process and model, which revision the model runs as: a producer that
    cannot resolve the model itself takes it as current (``pixelmill.db.content_index``)."""
    key = (task, model, revision or "")
    if revision is None or key in ctx.recorded:
        return

    def record() -> None:
        with ctx.sessions.begin() as session:
            record_revision(session, task, model, revision)

    retry.call(record)
    ctx.recorded.add(key)


@dataclass(frozen=True)
class _Unusable:
    reason: str


def _prepare(
    ctx: WorkerContext,
    runner: Runner[Any],
    job: ClaimedJob,
    options: TaskOptions,
    tracked: Tracked,
    seen: dict[str, ContentSeen],
    fetch: Future[Any] | None = None,
) -> Any:
    """Fetch (an s3:// input, or the uploaded copy of one), decode and preprocess one input; a
    bad input becomes an _Unusable naming it. Runs on the decode pool, so fetches overlap each
    other and the forward pass of the batch before."""
    try:
        return runner.prepare(_source(ctx, job, seen, fetch, tracked), job.params, options)
    except (BadInput, ModelUnavailable) as exc:
        return _Unusable(str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoder bug fails this one job only
        log.exception("unexpected error preparing %s", job.input)
        return _Unusable(f"{job.input}: cannot prepare image ({type(exc).__name__}: {exc})")
    finally:
        tracked.touch()


def _source(
    ctx: WorkerContext,
    job: ClaimedJob,
    seen: dict[str, ContentSeen],
    fetch: Future[Any] | None,
    tracked: Tracked | None = None,
) -> str | Fetched:
    """What the runner reads: the input's bytes (a file read now, an object fetched by
    ``fetch`` with the message or now, an uploaded copy), each hashed on the way, so that the
    result is filed under the bytes really processed, whatever the file became since the
    submit hashed it. A file larger than ``max_fetch_bytes`` is decoded from its path instead,
    and filed under no content (never reused); so is a file whose job has no content hash (the
    submit did not hash it: generate's init images, jobs made by other means).

    A fetch the object store fails for a moment (unreachable, timing out, a 5xx while it
    restarts) is tried again in place, for up to PIXELMILL_TRANSIENT_RETRY_SECONDS (within the
    read's own deadline), keeping the job's lease; only then, or for an object that is gone,
    does the job fail, naming why."""
    retry = Retrier(ctx.transient_retry, tracked)
    stored = job.params.get(STORED_INPUT)
    if isinstance(stored, str):
        store = ctx.store
        if store is None:
            raise BadInput(f"{job.input}: uploaded, but this worker has no object store")
        try:
            data = retry.call(store.get, stored)
        except PixelmillError as exc:
            raise BadInput(f"{job.input}: cannot fetch its uploaded copy ({exc})") from None
        seen[job.job_id] = ContentSeen(job.input, len(data), None, _sha256(data))
        return Fetched(job.input, data)
    path = job_path(job.input, job.params)
    if is_remote(path):

        def again() -> Any:
            return ctx.remote.fetch(path, max_bytes=ctx.max_fetch_bytes)

        try:
            obj = fetch.result() if fetch is not None else again()
        except StoreError as exc:  # the endpoint away for a moment: tried again in place
            if not exc.transient:
                raise BadInput(str(exc)) from None
            try:
                obj = retry.call(again)
            except GaveUp as gave_up:
                raise BadInput(f"{path}: cannot fetch the object ({gave_up})") from None
        seen[job.job_id] = ContentSeen(path, len(obj.data), obj.etag, _sha256(obj.data))
        return Fetched(path, obj.data)
    if job.content_sha256 is None:
        return path  # nothing was hashed at submit, so nothing to file a result under
    fp, size = open_input(path)  # a FIFO, a device, a directory: refused, naming why
    with fp:
        if ctx.max_fetch_bytes is not None and size > ctx.max_fetch_bytes:
            seen[job.job_id] = ContentSeen(job.input, size, None, None)
            return path
        try:
            data = fp.read()
        except OSError as exc:
            raise BadInput(f"{job.input}: cannot read the file ({exc.strerror or exc})") from None
    seen[job.job_id] = ContentSeen(job.input, len(data), None, _sha256(data))
    return Fetched(job.input, data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _forward_isolating_failures(
    ctx: WorkerContext,
    tracked: Tracked,
    runner: Runner[Any],
    pending: list[tuple[ClaimedJob, Future[Any]]],
    ready_items: Callable[[list[tuple[ClaimedJob, Future[Any]]]], list[tuple[ClaimedJob, Any]]],
    options: TaskOptions,
    passes: list[tuple[int, float]] | None = None,
) -> list[tuple[ClaimedJob, dict[str, Any] | BaseException]]:
    """Run the message in forward passes of the device's size, each as soon as its items are
    decoded; if a pass raises, split it in halves down to single items, so that only an item
    that fails alone fails (out-of-memory on a large batch, one poisonous input). Each pass's
    size and duration, failed ones too, go to ``passes`` (the metrics' histograms).

    The device is held for the whole message, not per pass: the message that got there first
    finishes first (and is acked), while the next one decodes. Interleaving their passes would
    delay both, and leave a worker idle at the end of a run while another finishes two."""

    def forward(chunk: list[Any]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        try:
            return runner.run(chunk, options)
        except Exception as exc:
            ctx.cache.relieve(exc, keep=runner)
            raise
        finally:
            if passes is not None:
                passes.append((len(chunk), time.perf_counter() - started))
            tracked.touch()

    size = ctx.device_batch or len(pending)
    results: list[tuple[ClaimedJob, dict[str, Any] | BaseException]] = []
    with _device(ctx, tracked):
        for start in range(0, len(pending), size):
            ready = ready_items(pending[start : start + size])
            if ready:
                out = _split_on_error(forward, [item for _, item in ready])
                results.extend(zip([job for job, _ in ready], out, strict=True))
    return results


@contextlib.contextmanager
def _device(ctx: WorkerContext, tracked: Tracked) -> Iterator[None]:
    """The device, for one batch. Waiting behind a batch that makes progress counts as
    progress; waiting behind a stalled one does not (both lose their leases)."""
    while not ctx.device_lock.acquire(timeout=1):
        holder = ctx.device_holder
        if holder is not None and time.monotonic() - holder.last_progress <= ctx.stall:
            tracked.touch()
    ctx.device_holder = tracked
    try:
        yield
    finally:
        ctx.device_holder = None
        ctx.device_lock.release()


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
