"""The Python API: ``Client.submit``, ``wait``, ``status``, ``results``."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pixelmill.catalog import IMAGE_EXTENSIONS, job_path
from pixelmill.db.control import (
    cancel_batch,
    cancel_queued,
    pause_batch,
    resume_batch,
    set_priority,
)
from pixelmill.db.dead_letters import DeadLetterRecord, count_dead_letters, recent_dead_letters
from pixelmill.db.engine import configured_database
from pixelmill.db.jobs import (
    create_batch,
    refresh_statistics,
    requeue_failed,
    retire_fingerprint,
)
from pixelmill.db.reads import (
    batch_by_fingerprint,
    batch_counts,
    batch_failures,
    get_batch,
    has_other_revision,
    iter_batch_jobs,
    last_finished_at,
    queued_count,
    recent_batches,
    unfinished_batch,
)
from pixelmill.db.records import BatchCounts, Failures, JobResult, NewBatch
from pixelmill.db.sources import RemoteObject, S3Inputs, is_remote
from pixelmill.db.store import LocalStore, open_store
from pixelmill.db.window import open_window
from pixelmill.errors import InputError, PixelmillError, ServiceUnavailable
from pixelmill.producer.inputs import JobPlan, expand_inputs, plan_jobs, storable
from pixelmill.producer.reuse import (
    NEW,
    Contents,
    ReusePlan,
    count_actions,
    current_revision,
    identify,
    plan_reuse,
    remember,
    upload_inputs,
)
from pixelmill.settings import Settings, load_settings, mask_secrets, mask_url
from pixelmill.wire import PRIORITIES, create_app, enqueue, message_size

if TYPE_CHECKING:  # searching loads torch: imported when a search runs, never at submit
    from pixelmill.producer.search import Relabelled, Searcher, SearchHit


CANCEL_CHUNK = 50_000  # queued jobs a cancel ends per transaction
# A batch this big changes the jobs table enough that PostgreSQL's planner, until autovacuum
# analyzes it (minutes later, or not before the next quiet moment), would read the whole batch
# to show its first page of results: the submit refreshes the statistics itself.
ANALYZE_AT = 50_000


@dataclass(frozen=True)
class Submission:
    """A submitted batch. ``jobs``: its size; ``queued``: the jobs enqueued for the workers
    (the rest were done at once, reused); ``existing``: this exact submit was made before and
    this is that batch; ``attached``: a batch over the same source was still in progress and
    this is that one (nothing new was registered). ``plan``: how many inputs were new,
    changed, stale and reused (None for generate)."""

    batch_id: str
    jobs: int
    existing: bool = False
    attached: bool = False
    queued: int | None = None
    plan: dict[str, int] | None = None

    @property
    def reused(self) -> int:
        return (self.plan or {}).get("reused", 0)


@dataclass(frozen=True)
class Plan:
    """What a submit would do, before anything is registered or enqueued (``Client.plan``):
    per input, its action (new, changed, stale, reused, or forced with ``force``) and the job
    a reused one takes its result from."""

    task: str
    model: str
    revision: str | None
    inputs: list[str]
    actions: list[str]
    reused_from: dict[int, str]
    counts: dict[str, int]


def fingerprint(
    task: str,
    model: str,
    options: dict[str, Any],
    plan: JobPlan,
    listed: Mapping[str, RemoteObject] | None = None,
) -> str | None:
    """What identifies a submission: task, model, options and each input
    as it is on disk now (path, size, modification time), with its parameters. (A batch found
    by it whose results came from an older model revision is not returned: ``_resume``.)"""
    entries: list[Any] = []
    for i, name in enumerate(plan.inputs):
        params = plan.params[i] if plan.params is not None else {}
        path = job_path(name, params or {})
        obj = (listed or {}).get(name)
        try:
            if obj is not None:
                stamp: Any = [obj.size, obj.etag]
            else:
                st = os.stat(path)
                stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None  # a prompt, or a file that is not there (it will fail its job)
        entries.append([name, stamp, params])
    body = {
        "task": task,
        "model": model,
        "options": options,
        "inputs": entries,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def source_key(
    task: str, model: str, options: dict[str, Any], typed: Sequence[str], paths: Sequence[str]
) -> str:
    """What two runs over the same source share whatever the files in it now: the task, the
    model, the options and the INPUT arguments as typed (absolute; a list read from stdin
    counts as its paths)."""
    given = sorted(a if is_remote(a) else os.path.abspath(a) for a in typed if a != "-")
    body = {
        "task": task,
        "model": model,
        "options": options,
        "inputs": given,
        "listed": list(paths) if "-" in typed else None,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def no_images_found(typed: Sequence[str]) -> str:
    """What a submit that found nothing says: where it looked, and for what."""
    where = ", ".join("stdin" if t == "-" else t for t in typed[:3])
    where += f" and {len(typed) - 3} more" if len(typed) > 3 else ""
    kinds = " ".join(sorted(IMAGE_EXTENSIONS))
    return (
        f"no input images found in {where}: folders are searched recursively for files "
        f"named {kinds} (any case; hidden ones skipped)"
    )


class _LazyS3:
    """S3Inputs made on first use: most submits name no s3:// input."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._inputs: S3Inputs | None = None

    def list(self, uri: str, extensions: Collection[str]) -> Iterator[RemoteObject]:
        if self._inputs is None:
            self._inputs = S3Inputs(self.settings)
        return self._inputs.list(uri, extensions)


@dataclass
class _Prepared:
    task: str
    model: str
    plan: JobPlan
    stored: dict[str, Any]
    size: int
    recipe: str | None
    source: str | None
    listed: dict[str, RemoteObject]


@dataclass(frozen=True)
class _Found:
    """What a new batch takes over from earlier ones (``Client._earlier``)."""

    revision: str | None
    fingerprint: str | None = None
    stale: str | None = None


@dataclass(frozen=True)
class _Work:
    """What a new batch's jobs are (``Client._plan_work``)."""

    found: _Found
    params: list[dict[str, Any]] | None
    contents: Contents | None = None
    reuse: ReusePlan | None = None


class Client:
    """A producer connected to the configured (or embedded) database and broker."""

    def __init__(self, settings: Settings | None = None, *, create: bool = True) -> None:
        """``create=False`` (for reading: status, results, retry): a SQLite database that does
        not exist is a ConfigError ("no database at PATH") instead of a new, empty one. A
        configured SQLite path's folder must exist; the embedded default's is created."""
        self.settings = settings or load_settings()
        database = configured_database(self.settings, create=create)
        self.engine = database.engine
        self.sessions: sessionmaker[Session] = database.sessions
        self._app: Any = None
        self._search: Searcher | None = None

    @property
    def app(self) -> Any:
        if self._app is None:
            self._app = create_app(self.settings)
        return self._app

    # ---- search and relabel ------------------------------------------------------------

    def search(
        self,
        query: str | None = None,
        *,
        image: str | None = None,
        model: str | None = None,
        batch: str | None = None,
        source: str | None = None,
        limit: int = 20,
    ) -> list[SearchHit]:
        """The ``limit`` embedded images nearest the text ``query`` (or the image file
        ``image``), best first, each input once: over ``batch``, inputs under ``source``, or
        everything embedded with ``model`` (default: the batch's, or the only model there).
        The query is embedded here, on the CPU (this loads torch and the model, once per
        Client). InputError when nothing was embedded in scope with the model."""
        return self._searcher().search(query, image=image, model=model, batch=batch,
                                       source=source, limit=limit)  # fmt: skip

    def relabel(
        self,
        batch: str,
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        name: str | None = None,
    ) -> Relabelled:
        """Score ``labels`` against embed batch ``batch``'s stored embeddings on the CPU (no
        image read again) and record the result as a new classify batch (returned)."""
        return self._searcher().relabel(batch, labels, templates=templates, top_k=top_k,
                                        name=name)  # fmt: skip

    def _searcher(self) -> Searcher:
        if self._search is None:
            from pixelmill.producer.search import Searcher

            self._search = Searcher(self.sessions)
        return self._search

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
        self.engine.dispose()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- submit --------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        inputs: Iterable[str] = (),
        *,
        model: str | None = None,
        name: str | None = None,
        batch_size: int | None = None,
        options: dict[str, Any] | None = None,
        prompts: Sequence[str] | None = None,
        count: int = 1,
        seed: int | None = None,
        again: bool = False,
        force: bool = False,
        upload: bool = False,
        priority: str = "normal",
        labels: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        share: int = 1,
    ) -> Submission:
        """Register the jobs, commit, then enqueue the job ids in chunks of ``batch_size``
        (one message per model batch).

        classify and caption are incremental by content: an input whose bytes were processed
        before with the same task, model (and its current revision), options and pixelmill
        preprocessing is done at once with that result (reused, pointing at the job that
        computed it); only the others are enqueued. ``force=True`` reuses nothing.

        ``upload=True``: the local files to process are copied into the object store first,
        under content-addressed keys (``inputs/<sha256>``; one already there is not copied
        again), and the workers fetch them from there: no shared mount needed. Jobs and results
        still name the original paths.

        The same submit twice (same task, model, options and inputs, the files unchanged on
        disk) returns the first batch instead of doing the work again, and enqueues its jobs
        that are still queued (a producer killed halfway through enqueueing left them without
        a message). ``again=True`` makes a new batch anyway. Generate without a ``seed`` is
        always new (a random seed is drawn). While a batch over the same INPUT arguments (task,
        model, options) is still in progress, a submit returns that batch (``attached``)
        instead of registering the same work a second time.

        classify and caption: one job per input image. generate: ``prompts`` x ``count``
        images, or with ``inputs`` (init images) image-to-image over each of them; ``seed``
        is the first of consecutive per-image seeds. ``options`` are the task's options
        (``pixelmill.tasks``: e.g. ``max_new_tokens`` for caption, ``steps``/``width``/
        ``height``/``strength`` for generate); a bad one raises BadInput naming it.

        ``priority`` (high, normal, low): workers take a higher priority batch's messages
        before any of a lower one's (``pause``, ``resume``, ``cancel`` and ``set_priority``
        act on a batch afterwards). ``share`` (1 or more): its weight among the batches of its
        priority that run at the same time; a batch of share 2 gets twice the workers of one
        of share 1 (``pixelmill.db.window``). Only the batch's first messages go to the broker
        now (PIXELMILL_WINDOW x share); the workers send the rest as they take them.

        classify with ``labels`` (and ``templates``: sentences with ``{}``): zero-shot, scored
        by a CLIP-style model (default ``openai/clip-vit-base-patch32``); the same as
        ``options={"labels": ..., "templates": ...}``. ``embed``: one image embedding per
        input, for ``search`` and ``relabel``.
        """
        if priority not in PRIORITIES:
            raise InputError(f"priority must be one of high, normal, low, not {priority!r}")
        if isinstance(share, bool) or not isinstance(share, int) or share < 1:
            raise InputError(f"share must be a whole number, 1 or more, not {share!r}")
        options = with_labels(options, labels, templates)
        prep = self._prepare(task, inputs, model, batch_size, options, prompts, count, seed)
        self.check_broker()
        with self._source_lock(prep.source):
            earlier = self._earlier(prep, again=again, force=force)
            if isinstance(earlier, Submission):
                return earlier
            work = self._plan_work(prep, earlier, force=force, upload=upload)
            new = self._register(prep, work, name=name, priority=priority, share=share)
            if isinstance(new, Submission):
                return new
            enqueue(self.app, new.job_ids, prep.size, priority)
        return Submission(
            batch_id=new.batch_id,
            jobs=len(prep.plan.inputs),
            queued=new.queued,
            plan=work.reuse.counts if work.reuse else None,
        )

    def _earlier(self, prep: _Prepared, *, again: bool, force: bool) -> Submission | _Found:
        """Step 1: a batch this submit already made (the same submit before, or one over the
        same source still in progress), returned as it is; else what the new batch needs to
        know of the past: its fingerprint, the stale batch it takes that over from, and the
        model's current revision."""
        revision = self._revision(prep)
        if again or force:
            return _Found(revision=revision)
        print_ = fingerprint(prep.task, prep.model, prep.stored, prep.plan, prep.listed)
        earlier = self._resume(print_, revision) if print_ is not None else None
        if isinstance(earlier, Submission):
            return earlier
        if prep.source is not None:
            running = self._in_progress(prep.source)
            if running is not None:
                return running
        return _Found(revision=revision, fingerprint=print_, stale=earlier)

    def _plan_work(self, prep: _Prepared, found: _Found, *, force: bool, upload: bool) -> _Work:
        """Step 2: what each input's bytes are, which results can be reused, and (``upload``)
        the inputs to process copied into the object store."""
        if prep.recipe is None:
            return _Work(found, params=prep.plan.params)
        contents = identify(
            self.sessions, prep.plan.inputs, prep.plan.params, listed=prep.listed,
            read_timeout=self.settings.read_timeout, trust_stat=not force,
        )  # fmt: skip
        with self.sessions() as session:
            reuse = plan_reuse(session, task=prep.task, model=prep.model, recipe=prep.recipe,
                               revision=found.revision, contents=contents, force=force)  # fmt: skip
        params = prep.plan.params
        if upload:
            params = upload_inputs(
                open_store(self.settings.resolved_store_url(), self.settings),
                prep.plan.inputs, params, contents.sha256, skip=reuse.reused,
            )  # fmt: skip
        return _Work(found, params=params, contents=contents, reuse=reuse)

    def _register(
        self, prep: _Prepared, work: _Work, *, name: str | None, priority: str, share: int
    ) -> NewBatch | Submission:
        """Step 3: the batch and its jobs committed (reused jobs done at once); the earlier
        batch instead if the same submit committed first from elsewhere."""
        found, contents, reuse = work.found, work.contents, work.reuse
        try:
            with self.sessions.begin() as session:
                if found.stale is not None:
                    retire_fingerprint(session, found.stale)
                new = create_batch(
                    session,
                    task=prep.task,
                    model=prep.model,
                    inputs=prep.plan.inputs,
                    params=work.params,
                    name=name,
                    options=prep.stored,
                    queued_lease=self.settings.queued_lease_seconds,
                    fingerprint=found.fingerprint,
                    contents=contents.sha256 if contents else None,
                    reused=reuse.reused if reuse else None,
                    recipe=prep.recipe,
                    source_key=prep.source,
                    plan=reuse.counts if reuse else None,
                    priority=priority,
                    message_size=prep.size,
                    share=share,
                    window=self.settings.window,
                )
        except IntegrityError:  # the same submit, at the same moment, from elsewhere
            earlier = self._resume(found.fingerprint) if found.fingerprint is not None else None
            if not isinstance(earlier, Submission):
                raise
            return earlier
        if contents is not None:
            remember(self.sessions, contents)
        if len(prep.plan.inputs) >= ANALYZE_AT:
            with self.sessions.begin() as session:
                refresh_statistics(session)
        return new

    def plan(
        self,
        task: str,
        inputs: Iterable[str] = (),
        *,
        model: str | None = None,
        options: dict[str, Any] | None = None,
        force: bool = False,
        labels: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
    ) -> Plan:
        """What ``submit`` would do with the same arguments, registering and enqueueing
        nothing (no broker needed): each input new, changed, stale or reused. For classify,
        caption and embed (generate is never reused: every image is new)."""
        options = with_labels(options, labels, templates)
        prep = self._prepare(task, inputs, model, None, options, None, 1, None)
        revision = self._revision(prep)
        n = len(prep.plan.inputs)
        if prep.recipe is None:
            actions, reused = [NEW] * n, {}
        else:
            contents = identify(self.sessions, prep.plan.inputs, prep.plan.params,
                                listed=prep.listed, read_timeout=self.settings.read_timeout,
                                trust_stat=not force)  # fmt: skip
            with self.sessions() as session:
                reuse = plan_reuse(session, task=prep.task, model=prep.model, recipe=prep.recipe,
                                   revision=revision, contents=contents, force=force)  # fmt: skip
            actions, reused = reuse.actions, reuse.reused
        counts = count_actions(actions)
        return Plan(task=prep.task, model=prep.model, revision=revision,
                    inputs=prep.plan.inputs, actions=actions, reused_from=reused,
                    counts=counts)  # fmt: skip

    def _prepare(
        self,
        task: str,
        inputs: Iterable[str],
        model: str | None,
        batch_size: int | None,
        options: dict[str, Any] | None,
        prompts: Sequence[str] | None,
        count: int,
        seed: int | None,
    ) -> _Prepared:
        """Everything a submit decides before it looks at the database: the inputs, the jobs,
        the options validated, the recipe and the source key. BadInput on misuse."""
        from pixelmill import tasks  # the task types: for a submit, not for `status`

        kind = tasks.get(task)
        model = model or kind.model_for(options or {})
        if model != "null":  # the null model runs every task
            kind.check_model(model, options or {})
        typed = [os.fspath(i) for i in inputs]
        remote = _LazyS3(self.settings)  # made on the first s3:// input (argument or stdin)
        listed: dict[str, RemoteObject] = {}
        paths = expand_inputs(typed, remote=remote, listed=listed)
        if typed and not paths:
            raise InputError(no_images_found(typed))
        plan = storable(plan_jobs(task, paths, prompts=prompts, count=count, seed=seed))
        size = batch_size or self.settings.batch_size or kind.default_batch_size
        opts = kind.validate(options, model, has_inputs=bool(paths) if kind.takes_prompts else None)
        stored = opts.model_dump(mode="json", exclude_none=True)
        rec = kind.recipe(model, stored)
        source = source_key(task, model, stored, typed, paths) if rec is not None else None
        return _Prepared(task, model, plan, stored, size, rec, source, listed)

    def _revision(self, prep: _Prepared) -> str | None:
        if prep.recipe is None:
            return None
        with self.sessions() as session:
            return current_revision(session, prep.task, prep.model)

    def _in_progress(self, source: str) -> Submission | None:
        """The newest batch over the same source that still has unfinished jobs, if any."""
        with self.sessions() as session:
            batch = unfinished_batch(session, source)
            if batch is None:
                return None
            found = Submission(batch_id=batch.id, jobs=batch.total, attached=True,
                               queued=queued_count(session, batch.id), plan=batch.plan)  # fmt: skip
        self._send_window(batch.id)  # harmless if they have messages already
        return found

    @contextlib.contextmanager
    def _source_lock(self, source: str | None) -> Iterator[None]:
        """Two submits over the same source on this host take turns to plan and register, so
        that the second one finds the first one's batch (across hosts, the database check in
        ``_in_progress`` is what remains)."""
        if source is None:
            yield
            return
        folder = self.settings.data_dir.expanduser() / "locks"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / f"source-{source[:32]}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield  # a read-only data folder: the database check still holds
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _resume(self, print_: str, revision: str | None = None) -> Submission | str | None:
        """The batch this exact submit made before, with its still-queued jobs enqueued again
        (a duplicate message is harmless: a claim skips finished jobs). If its results came
        from another model revision than ``revision``, it is stale: its id is returned
        instead, for the new batch to take its fingerprint over."""
        with self.sessions() as session:
            batch = batch_by_fingerprint(session, print_)
            if batch is None:
                return None
            if batch.cancelled_at is not None or (batch.recipe is not None and (
                (revision is not None and has_other_revision(session, batch.id, revision))
                or batch_counts(session, batch.id).by_status.get("failed")
            )):  # fmt: skip
                # Cancelled, stale, or with failures worth another go (a file fixed, a service
                # back): a new batch, which reuses what was done and runs the rest again.
                return batch.id
            found = Submission(batch_id=batch.id, jobs=batch.total, existing=True,
                               queued=queued_count(session, batch.id), plan=batch.plan)  # fmt: skip
        self._send_window(batch.id)
        return found

    def _send_window(self, batch_id: str) -> None:
        """Send the batch's window again (a producer killed between its commit and its
        enqueue left it without messages; a duplicate message is harmless)."""
        with self.sessions.begin() as session:
            window = open_window(session, batch_id, window=self.settings.window,
                                 lease=self.settings.queued_lease_seconds)  # fmt: skip
        enqueue(self.app, window.job_ids, window.size, window.priority)

    def check_broker(self) -> None:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds here
            url = self.settings.resolved_broker_url()
            where, why = mask_url(url), mask_secrets(str(exc), url)
            hint = (
                " (nothing configured: start `pixelmill worker` for the embedded broker, "
                "use `pixelmill run`, or set PIXELMILL_BROKER_URL)"
                if self.settings.embedded_broker
                else ""
            )
            raise ServiceUnavailable(f"cannot reach the broker at {where}: {why}{hint}") from None

    def retry(self, batch_id: str) -> int:
        """Run the batch's failed jobs again (attempts reset); returns how many."""
        with self.sessions() as session:
            failed = batch_counts(session, batch_id).by_status.get("failed", 0)
        self._control(batch_id, requeue_failed)
        return failed

    # ---- control -------------------------------------------------------------------------

    def pause(self, batch_id: str) -> bool:
        """Pause the batch: workers start none of its queued jobs (running ones finish) until
        ``resume``. False if it was paused already; InputError if it was cancelled."""
        with self.sessions.begin() as session:
            return pause_batch(session, batch_id)

    def resume(self, batch_id: str) -> int:
        """Resume a paused batch where it stopped; returns how many queued jobs it has left
        (0 if it was not paused)."""
        sent, queued = self._control(batch_id, resume_batch)
        return queued if sent else 0

    def cancel(self, batch_id: str) -> int:
        """Cancel the batch: its queued jobs end as cancelled (running ones finish, done ones
        keep their results); returns how many were cancelled. Takes effect at once: the
        first transaction marks the batch cancelled (no worker starts a job of it after its
        commit), the queued jobs then end cancelled CANCEL_CHUNK at a time."""
        with self.sessions.begin() as session:
            total = cancel_batch(session, batch_id, seqs=range(0, CANCEL_CHUNK))
            batch = get_batch(session, batch_id)
            size, cancelled = batch.total, batch.cancelled_at is not None
        for start in range(CANCEL_CHUNK, size if cancelled else 0, CANCEL_CHUNK):
            with self.sessions.begin() as session:
                total += cancel_queued(session, batch_id, range(start, start + CANCEL_CHUNK))
        return total

    def set_priority(self, batch_id: str, priority: str) -> int:
        """Move the batch's queued jobs to ``priority`` (high, normal, low); returns how many
        moved (0 if it had that priority, or is paused: its resume moves them)."""
        sent, queued = self._control(
            batch_id, lambda s, b, **kw: set_priority(s, b, priority, **kw)
        )
        return queued if sent else 0

    def _control(self, batch_id: str, change: Callable[..., list[str]]) -> tuple[list[str], int]:
        """Apply ``change`` (which returns job ids to enqueue: the batch's window) in one
        transaction, then enqueue those ids at the batch's priority, after the commit. Returns
        them, and the batch's queued jobs as that transaction left them (workers start some
        as soon as the window is sent)."""
        self.check_broker()
        with self.sessions.begin() as session:
            job_ids = change(session, batch_id, queued_lease=self.settings.queued_lease_seconds,
                             window=self.settings.window)  # fmt: skip
            batch = get_batch(session, batch_id)
            size, priority = message_size(batch.message_size), batch.priority
            queued = queued_count(session, batch_id)
        enqueue(self.app, job_ids, size, priority)
        return job_ids, queued

    # ---- read ----------------------------------------------------------------------------

    def status(self, batch_id: str) -> BatchCounts:
        with self.sessions() as session:
            return batch_counts(session, batch_id)

    def batches(self, limit: int = 20) -> list[BatchCounts]:
        """The newest batches, newest first, with their counts per state."""
        with self.sessions() as session:
            return recent_batches(session, limit)

    def dead_letters(self, limit: int = 20) -> tuple[int, list[DeadLetterRecord]]:
        """How many messages the workers refused, and the newest ``limit`` of them."""
        with self.sessions() as session:
            count = count_dead_letters(session)
            return count, recent_dead_letters(session, limit) if limit and count else []

    def finished_at(self, batch_id: str) -> datetime | None:
        """When the batch's last job finished (UTC), or None if none has."""
        with self.sessions() as session:
            return last_finished_at(session, batch_id)

    def failures(self, batch_id: str, *, examples: int = 3, limit: int = 20) -> Failures:
        """The batch's failed jobs by kind of failure, most frequent first, with a few example
        inputs each (``limit`` kinds at most; ``Failures.more_kinds`` says how many more)."""
        with self.sessions() as session:
            return batch_failures(session, batch_id, examples=examples, limit=limit)

    def wait(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        interval: float = 0.5,
        on_progress: Callable[[BatchCounts], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> BatchCounts:
        """Block until every job of the batch is done, failed or cancelled; returns the final
        counts. A paused batch is waited for (until it is resumed, or cancelled: its running
        jobs finish, then this returns, ``counts.cancelled`` true).
        ``check`` runs each round (e.g. to supervise local workers); ``TimeoutError`` after
        ``timeout`` seconds. A database that stops answering is waited for (the workers wait
        for it too) up to PIXELMILL_SERVICE_TIMEOUT, then ``ServiceUnavailable``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        pause = 0.0
        while True:
            try:
                counts = self.status(batch_id)
            except OperationalError as exc:
                now = time.monotonic()
                down_since = down_since if down_since is not None else now
                grace = self.settings.service_timeout
                if now - down_since > grace:
                    raise ServiceUnavailable(
                        f"the database has not answered for {grace:g}s "
                        f"({str(exc.orig).strip()}); batch {batch_id} was not finished"
                    ) from None
            else:
                down_since = None
                if on_progress is not None:
                    on_progress(counts)
                if counts.complete:
                    return counts
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id}: not finished after {timeout:g}s")
            if check is not None:
                check()
            # Short at first (a batch with little left to do ends in a fraction of a second),
            # then every ``interval``.
            pause = min(interval, pause * 2) if pause else min(interval, 0.05)
            time.sleep(pause)

    def results(self, batch_id: str) -> Iterator[JobResult]:
        with self.sessions() as session:
            yield from iter_batch_jobs(session, batch_id)

    def download(self, batch_id: str, folder: str | os.PathLike[str]) -> list[Path]:
        """Copy the batch's artifacts from the object store into ``folder`` (named by their
        keys' file names, ``<job id>-0.png``), checking each one's sha256. Returns the paths."""
        out = LocalStore(Path(folder))  # atomic writes, and no name escapes the folder
        out.root.mkdir(parents=True, exist_ok=True)
        store = open_store(self.settings.resolved_store_url(), self.settings)
        saved: list[Path] = []
        for row in self.results(batch_id):
            if row.artifact is None:
                continue
            data = store.get(row.artifact.key)
            if hashlib.sha256(data).hexdigest() != row.artifact.sha256:
                raise PixelmillError(
                    f"artifact {row.artifact.key} of job {row.job} does not match its recorded "
                    "sha256: the stored object was changed or damaged"
                )
            name = PurePosixPath(row.artifact.key).name
            out.put(name, data, content_type=row.artifact.content_type)
            saved.append(out.root / name)
        return saved


def with_labels(
    options: dict[str, Any] | None,
    labels: Sequence[str] | None,
    templates: Sequence[str] | None,
) -> dict[str, Any] | None:
    """``options`` with ``labels`` and ``templates`` (keyword sugar) merged in; InputError if
    both name the same option."""
    extra = {k: list(v) for k, v in (("labels", labels), ("templates", templates)) if v is not None}
    if not extra:
        return options
    twice = sorted(set(extra).intersection(options or {}))
    if twice:
        raise InputError(f"{twice[0]} given twice: as a keyword and in options")
    return {**(options or {}), **extra}
