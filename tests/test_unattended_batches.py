"""Unattended runs never hang, never orphan, and fail for the right reason.

In process (a real SQLite database, real runners, real threads): leases are renewed only for
batches in progress; a hung read is abandoned at its deadline; an unexpected error fails the
jobs it hit with its message; a database write that fails after the claim is retried in place
without counting an attempt. Against real processes (a real Redis, real `pixelmill worker`
processes): unloadable models, hung reads and object-store outages end every job done or
failed with its real reason, never running for good.
"""

from __future__ import annotations

import os
import sqlite3
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from sqlalchemy import event, select

from pixelmill.db.engine import make_engine, make_sessionmaker
from pixelmill.db.jobs import claim_jobs, create_batch
from pixelmill.db.migrate import upgrade
from pixelmill.db.reads import iter_batch_jobs
from pixelmill.db.schema import Job, JobStatus
from pixelmill.errors import ModelUnavailable
from pixelmill.models.base import IMAGE
from pixelmill.models.cache import ModelCache
from pixelmill.models.null import NullRunner
from pixelmill.tasks import TaskOptions
from pixelmill.worker.batching import WorkerContext, process_batch
from pixelmill.worker.heartbeat import Heartbeat
from tests.conftest import pixelmill, pixelmill_env
from tests.test_faults import _client, _env, _inputs, _until

# ---- in process ---------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[WorkerContext]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")

    # A short busy timeout, so that a locked database fails a write at once (as a database
    # that went away does) instead of after a minute.
    @event.listens_for(engine, "connect")
    def _short_busy(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA busy_timeout=100")

    upgrade(engine)
    context = WorkerContext(
        sessions=make_sessionmaker(engine),
        cache=ModelCache("cpu", top_k=5),
        device_label="cpu",
        worker_name="test@host/1",
        decode_threads=1,
        lease=60,
        read_timeout=1,
        stall=60,
        transient_retry=30,
    )
    yield context
    context.close()
    engine.dispose()


class Scripted(NullRunner):
    """The null model, with a script: inputs named ``hang`` block in prepare until released;
    forward waits for ``go``, then returns what ``result`` makes of each item."""

    def __init__(self, task: str = "classify", result: Any = None) -> None:
        super().__init__(task=task)
        self.release = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.forwarding = threading.Event()
        self.result = result or (lambda item: {"size": item})

    def prepare(self, input: str, params: dict[str, Any], options: TaskOptions) -> Any:
        if "hang" in input:
            self.release.wait(120)
        return len(input)

    def forward(self, batch: Any, options: TaskOptions) -> list[dict[str, Any]]:
        self.forwarding.set()
        assert self.go.wait(120)
        return [self.result(item) for item in batch]


def _with_runner(ctx: WorkerContext, runner: Scripted, name: str = "scripted") -> str:
    runner.load("cpu")
    ctx.cache._runners[(runner.for_task, name)] = runner
    return name


def _submit(ctx: WorkerContext, inputs: list[str], model: str, task: str = "classify") -> Any:
    with ctx.sessions.begin() as s:
        return create_batch(s, task=task, model=model, inputs=inputs)


def _jobs(ctx: WorkerContext, batch_id: str) -> list[Any]:
    with ctx.sessions() as s:
        return list(iter_batch_jobs(s, batch_id))


def _leases(ctx: WorkerContext, job_ids: list[str]) -> dict[str, datetime]:
    with ctx.sessions() as s:
        rows = s.execute(select(Job.id, Job.lease_until).where(Job.id.in_(job_ids))).all()
    return {r.id: r.lease_until.replace(tzinfo=UTC) for r in rows}


def _in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _lock_database(tmp_path: Path) -> sqlite3.Connection:
    """Hold SQLite's write lock from another connection: every write of the worker fails
    (database is locked) until it is released, as when the database is away."""
    conn = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None, timeout=30)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def test_the_heartbeat_renews_only_the_jobs_of_batches_in_progress(ctx, tmp_path):
    runner = Scripted()
    model = _with_runner(ctx, runner)
    working = _submit(ctx, ["/in/a.jpg", "/in/b.jpg"], model)
    idle = _submit(ctx, ["/in/held.jpg"], model)
    with ctx.sessions.begin() as s:  # held by this process, but no batch works on it
        claim_jobs(s, idle.job_ids, worker=ctx.worker_name, device="cpu", lease=0)
    ctx.lease = 30
    runner.go.clear()
    thread, out = _in_thread(process_batch, ctx, working.job_ids)
    assert runner.forwarding.wait(30)
    before = _leases(ctx, working.job_ids + idle.job_ids)
    heartbeat = Heartbeat(ctx, every=0.05)
    heartbeat.start()
    try:
        deadline = time.monotonic() + 60  # until the working jobs' leases were renewed
        while True:
            after = _leases(ctx, working.job_ids + idle.job_ids)
            if all(after[j] > before[j] for j in working.job_ids):
                break
            assert time.monotonic() < deadline, "the heartbeat never renewed the leases"
            time.sleep(0.05)
        time.sleep(0.2)  # a few more beats, each of which could have renewed the idle one
        after = _leases(ctx, working.job_ids + idle.job_ids)
    finally:
        heartbeat.stop()
        runner.go.set()
        thread.join(30)
    assert all(after[j] > before[j] for j in working.job_ids)  # renewed: in progress
    assert after[idle.job_ids[0]] == before[idle.job_ids[0]]  # never renewed
    assert out["value"].done == 2
    assert ctx.progress.job_ids() == []  # the finished batch is no longer tracked


def test_a_batch_that_stops_making_progress_loses_its_lease(ctx):
    runner = Scripted()
    model = _with_runner(ctx, runner)
    new = _submit(ctx, ["/in/a.jpg"], model)
    ctx.lease, ctx.stall = 30, 0.5
    runner.go.clear()  # the forward pass never returns (a hung device)
    thread, _ = _in_thread(process_batch, ctx, new.job_ids)
    assert runner.forwarding.wait(30)
    time.sleep(0.7)  # past the stall bound
    before = _leases(ctx, new.job_ids)
    heartbeat = Heartbeat(ctx, every=0.05)
    heartbeat.start()
    try:
        time.sleep(0.5)
        after = _leases(ctx, new.job_ids)
    finally:
        heartbeat.stop()
        runner.go.set()
        thread.join(30)
    assert after == before


def test_a_hung_read_fails_its_job_at_the_deadline_and_the_pool_goes_on(ctx):
    """One decode thread, and the first input never returns: the job fails at the deadline,
    the stuck thread is abandoned and replaced, and the rest of the batch (and the next
    batch) finishes."""
    runner = Scripted()
    model = _with_runner(ctx, runner)
    ctx.read_timeout = 0.5
    new = _submit(ctx, ["/in/hang-1.jpg", "/in/a.jpg", "/in/hang-2.jpg", "/in/b.jpg"], model)
    try:
        thread, out = _in_thread(process_batch, ctx, new.job_ids)
        thread.join(30)
        assert not thread.is_alive(), "the batch hung on a read that never returns"
        assert (out["value"].done, out["value"].failed) == (2, 2)
        rows = _jobs(ctx, new.batch_id)
        for row in rows:
            if "hang" in row.input:
                assert row.status == JobStatus.failed
                assert row.error == (
                    f"{row.input}: reading or decoding took longer than 0.5 s (a hung file system?)"
                )
            else:
                assert row.status == JobStatus.done, row.error
        after = _submit(ctx, ["/in/c.jpg", "/in/d.jpg"], model)
        assert process_batch(ctx, after.job_ids).done == 2
    finally:
        runner.release.set()


def test_an_unexpected_error_in_a_whole_group_fails_its_jobs_with_its_message(ctx):
    def boom(item: Any) -> dict[str, Any]:
        raise ValueError("collate: tensors of unequal size")

    model = _with_runner(ctx, Scripted(result=boom))
    new = _submit(ctx, ["/in/a.jpg", "/in/b.jpg", "/in/c.jpg"], model)
    report = process_batch(ctx, new.job_ids)
    assert (report.done, report.failed) == (0, 3)
    for row in _jobs(ctx, new.batch_id):
        assert row.status == JobStatus.failed
        assert row.input in row.error and "tensors of unequal size" in row.error


def test_an_unexpected_error_after_the_forward_pass_fails_the_jobs_not_orphans_them(ctx, tmp_path):
    """A result image that cannot be encoded (here: a mode PNG cannot hold) raised out of the
    batch and left its jobs running for good."""
    from pixelmill.db.store import LocalStore

    ctx.store = LocalStore(tmp_path / "store")
    cmyk = lambda item: {IMAGE: Image.new("CMYK", (8, 8))}  # noqa: E731
    model = _with_runner(ctx, Scripted("generate", result=cmyk))
    with ctx.sessions.begin() as s:
        params = [{"prompt": "a lighthouse", "seed": i} for i in range(2)]
        new = create_batch(s, task="generate", model=model, inputs=["a lighthouse"] * 2,
                           params=params)  # fmt: skip
    report = process_batch(ctx, new.job_ids)
    assert (report.done, report.failed) == (0, 2)
    for row in _jobs(ctx, new.batch_id):
        assert row.status == JobStatus.failed
        assert "cannot write mode CMYK as PNG" in row.error
    assert ctx.progress.job_ids() == []


def test_a_result_the_database_refuses_fails_only_its_own_job(ctx):
    """A non-transient error writing outcomes (here: a result that is not JSON) does not sink
    the batch: the outcomes are written one by one and only the refused one fails."""
    result = lambda item: {"raw": b"\x00"} if item == len("/in/bad.jpg") else {"n": item}  # noqa: E731
    model = _with_runner(ctx, Scripted(result=result))
    new = _submit(ctx, ["/in/a.jpg", "/in/bad.jpg", "/in/bb.jpg"], model)
    report = process_batch(ctx, new.job_ids)
    assert (report.done, report.failed) == (2, 1)
    rows = {row.input: row for row in _jobs(ctx, new.batch_id)}
    assert rows["/in/bad.jpg"].status == JobStatus.failed
    assert rows["/in/bad.jpg"].error.startswith("/in/bad.jpg: cannot record the result")
    assert "not JSON serializable" in rows["/in/bad.jpg"].error
    assert {rows[p].status for p in ("/in/a.jpg", "/in/bb.jpg")} == {JobStatus.done}


@pytest.mark.postgres
def test_a_data_error_on_postgresql_fails_only_the_refused_job(tmp_path, postgres_server):
    """PostgreSQL refuses a NaN in JSON (a model whose logits went NaN): a DataError. That job
    fails with the database's reason; the others of the batch are recorded."""
    engine = make_engine(postgres_server.create_database("t_dataerror"))
    upgrade(engine)
    pg = WorkerContext(sessions=make_sessionmaker(engine), cache=ModelCache("cpu"),
                       device_label="cpu", worker_name="test@host/2")  # fmt: skip
    try:
        result = lambda item: {"score": float("nan") if item == 11 else 0.5}  # noqa: E731
        model = _with_runner(pg, Scripted(result=result))
        new = _submit(pg, ["/in/a.jpg", "/in/bad.jpg", "/in/bb.jpg"], model)
        report = process_batch(pg, new.job_ids)
        assert (report.done, report.failed) == (2, 1)
        rows = {row.input: row for row in _jobs(pg, new.batch_id)}
    finally:
        pg.close()
        engine.dispose()
    assert rows["/in/bad.jpg"].status == JobStatus.failed
    assert rows["/in/bad.jpg"].error.startswith("/in/bad.jpg: cannot record the result (database:")
    assert "json" in rows["/in/bad.jpg"].error
    assert rows["/in/a.jpg"].result == {"score": 0.5}


def test_a_database_write_failing_after_the_claim_is_retried_without_an_attempt(ctx, tmp_path):
    runner = Scripted()
    model = _with_runner(ctx, runner)
    new = _submit(ctx, ["/in/a.jpg", "/in/b.jpg"], model)
    runner.go.clear()
    thread, out = _in_thread(process_batch, ctx, new.job_ids)
    assert runner.forwarding.wait(30)
    lock = _lock_database(tmp_path)
    try:
        runner.go.set()
        time.sleep(3)  # the write fails meanwhile, and is retried in place
        assert thread.is_alive()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    thread.join(60)
    assert "error" not in out, out.get("error")
    assert out["value"].done == 2
    rows = _jobs(ctx, new.batch_id)
    assert [(r.status, r.attempts) for r in rows] == [(JobStatus.done, 1)] * 2


def test_a_database_away_for_good_leaves_the_jobs_to_the_reconciler(ctx, tmp_path):
    """The write of the outcomes, then of the failures, is impossible for longer than the
    retry window: the batch gives up and its jobs are no longer renewed, so their lease
    lapses and the reconciler takes them back."""
    runner = Scripted()
    model = _with_runner(ctx, runner)
    new = _submit(ctx, ["/in/a.jpg"], model)
    ctx.transient_retry, ctx.lease = 1, 2
    runner.go.clear()
    thread, out = _in_thread(process_batch, ctx, new.job_ids)
    assert runner.forwarding.wait(30)
    lock = _lock_database(tmp_path)
    try:
        runner.go.set()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert "database" in str(out.get("error"))
    heartbeat = Heartbeat(ctx, every=0.05)
    heartbeat.start()
    try:
        time.sleep(2.5)
    finally:
        heartbeat.stop()
    (row,) = _jobs(ctx, new.batch_id)
    assert row.status == JobStatus.running
    assert _leases(ctx, new.job_ids)[row.job_id] < datetime.now(UTC)  # lapsed: not renewed


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("~nosuchuser/model", "nosuchuser"),
        ("x" * 300, "File name too long"),
        ("/tmp/" + "y" * 300, "File name too long"),
    ],
)
def test_a_model_name_the_system_refuses_is_model_unavailable(name, cause):
    cache = ModelCache("cpu")
    with pytest.raises(ModelUnavailable) as err:
        cache.get("classify", name)
    assert name in str(err.value) and cause in str(err.value)


def test_a_model_folder_that_is_not_a_model_is_model_unavailable(tmp_path):
    folder = tmp_path / "model"
    (folder / "config.json").mkdir(parents=True)
    with pytest.raises(ModelUnavailable, match="cannot load model"):
        ModelCache("cpu").get("classify", str(folder))


class _Failing(NullRunner):
    errors: list[BaseException] = []

    def _load(self, device: str) -> None:
        raise self.errors.pop(0)


@pytest.mark.parametrize(
    "errors",
    [
        [PermissionError(13, "Permission denied", "/models/secret/config.json")],
        [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")] * 2,
        [RuntimeError("Error(s) in loading state_dict: " + "size mismatch, " * 200)],
    ],
)
def test_every_load_failure_is_model_unavailable_with_its_whole_first_line(monkeypatch, errors):
    from pixelmill.tasks.classify import Classify

    monkeypatch.setitem(Classify.builtin_models["classify"], "failing", f"{__name__}:_Failing")
    monkeypatch.setattr(_Failing, "errors", list(errors))
    with pytest.raises(ModelUnavailable) as err:
        ModelCache("cpu").get("classify", "failing")
    message = str(err.value)
    assert "'failing'" in message
    assert str(errors[-1]).splitlines()[0].rstrip(". ") in message


def test_a_model_that_failed_to_load_is_not_loaded_again_for_every_message(monkeypatch):
    """Offline, each load of a hub id costs minutes of hub retries: a worker remembers the
    failure (models.cache.FAILED_LOAD_TTL) and fails the next messages' jobs at once."""
    from pixelmill.models import cache as cache_module
    from pixelmill.tasks.classify import Classify

    monkeypatch.setitem(Classify.builtin_models["classify"], "failing", f"{__name__}:_Failing")
    monkeypatch.setattr(_Failing, "errors", [OSError("hub unreachable"), OSError("again")])
    cache = ModelCache("cpu")
    with pytest.raises(ModelUnavailable, match="hub unreachable") as first:
        cache.get("classify", "failing")
    with pytest.raises(ModelUnavailable) as second:
        cache.get("classify", "failing")
    assert second.value is first.value
    assert len(_Failing.errors) == 1  # the second get did not try to load
    monkeypatch.setattr(cache_module, "FAILED_LOAD_TTL", 0.0)
    cache._failed.clear()
    with pytest.raises(ModelUnavailable, match="again"):
        cache.get("classify", "failing")  # once the failure has expired, it is tried again


# ---- against real processes ---------------------------------------------------------------


def _attempts(tmp_path: Path, batch: str) -> list[tuple[str, int]]:
    db = sqlite3.connect(tmp_path / "jobs.db")
    rows = db.execute("SELECT status, attempts FROM jobs WHERE batch_id=? ORDER BY seq",
                      (batch,)).fetchall()  # fmt: skip
    db.close()
    return rows


@pytest.mark.slow
def test_pixelmill_run_with_an_unusable_model_name_fails_its_jobs(tmp_path, photos):
    env = pixelmill_env(data_dir=str(tmp_path / "data"), lease_seconds="4",
                        reconcile_interval="1")  # fmt: skip
    started = time.monotonic()
    out = pixelmill("run", "classify", str(photos), "--model", "~nosuchuser/model", "--json",
                    "--timeout", "120", env=env, timeout=180)  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert time.monotonic() - started < 120
    import json

    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 4 and all(r["status"] == "failed" for r in rows)
    assert all("~nosuchuser/model" in r["error"] for r in rows), rows[0]["error"]


@pytest.mark.slow
def test_unloadable_models_fail_their_jobs_in_a_worker(tmp_path, redis_server, start_worker):
    # As root, a folder's permissions stop nothing: the worker is told that stat() of a path
    # holding "forbidden" is refused, as it is for any other user.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import errno, os, pathlib

        _stat = pathlib.Path.stat

        def stat(self, **kwargs):
            if "forbidden" in str(self):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return _stat(self, **kwargs)

        pathlib.Path.stat = stat
    """)
    )
    env = _env(tmp_path, redis_server.url, batch_size="4")
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env.get('PYTHONPATH', '')}"
    paths = _inputs(tmp_path / "in", 3)
    not_a_model = tmp_path / "not-a-model"
    (not_a_model / "config.json").mkdir(parents=True)
    models = {
        "x" * 300: "File name too long",
        str(tmp_path / "forbidden" / "model"): "Permission denied",
        str(not_a_model): str(not_a_model),
    }
    with _client(env) as client:
        subs = {m: client.submit("classify", paths, model=m) for m in models}
        start_worker(env)
        for model, cause in models.items():
            counts = client.wait(subs[model].batch_id, timeout=90)
            assert counts.by_status == {"failed": 3}, (model[:40], counts.by_status)
            (group,) = client.failures(subs[model].batch_id).groups
            reason = group.examples[0].error  # the kind, and the OS's detail in brackets
            assert group.jobs == 3 and model in reason and cause in reason, reason
        # and the worker is still up for a model that loads
        good = client.submit("classify", paths, model="null")
        assert client.wait(good.batch_id, timeout=60).by_status == {"done": 3}


@pytest.mark.slow
def test_a_hung_read_in_a_worker_fails_its_job_and_the_rest_finish(tmp_path, redis_server,
                                                                    start_worker):  # fmt: skip
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import threading
        import pixelmill.models.images as images

        _decode = images.decode_image

        def decode_image(path, **kwargs):
            if "hangme" in str(path):  # a dead NFS mount: the read never returns
                threading.Event().wait()
            return _decode(path, **kwargs)

        images.decode_image = decode_image
    """)
    )
    env = _env(tmp_path, redis_server.url, batch_size="8", read_timeout="2",
               decode_threads="2")  # fmt: skip
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env.get('PYTHONPATH', '')}"
    paths = _inputs(tmp_path / "in", 12)
    hung = []
    for i in range(3):  # more than the decode threads
        link = tmp_path / "in" / f"hangme{i}.jpg"
        os.link(paths[0], link)
        hung.append(str(link))
    with _client(env) as client:
        sub = client.submit("classify", [hung[0], *paths[:6], hung[1], hung[2], *paths[6:]])
        start_worker(env)
        counts = client.wait(sub.batch_id, timeout=120)
        reasons = client.failures(sub.batch_id)
    assert counts.by_status == {"done": 12, "failed": 3}, counts.by_status
    (group,) = reasons.groups
    assert group.jobs == 3 and group.kind == "reading or decoding took longer than 2 s", group
    assert {e.error for e in group.examples} == {
        f"{path}: reading or decoding took longer than 2 s (a hung file system?)" for path in hung
    }


def _generate(client: Any, tiny_sd: Path, n: int) -> Any:
    return client.submit("generate", prompts=["a lighthouse"], count=n, seed=1,
                         model=str(tiny_sd),
                         options={"steps": 1, "width": 32, "height": 32})  # fmt: skip


@pytest.mark.slow
def test_an_object_store_outage_longer_than_celerys_retries_costs_no_attempt(
    tmp_path, redis_server, tiny_sd, start_worker
):
    store = tmp_path / "store"
    store.write_text("not a folder: every write fails\n")  # the store's disk is gone
    env = _env(tmp_path, redis_server.url, store_url=str(store), batch_size="4")
    with _client(env) as client:
        sub = _generate(client, tiny_sd, 8)
        start_worker(env)
        _until(lambda: client.status(sub.batch_id).by_status.get("running", 0) >= 4,
               "nothing ran", timeout=120)  # fmt: skip
        time.sleep(15)  # longer than the old 3 retries (~8 s) and the lease
        assert client.status(sub.batch_id).by_status.get("done", 0) == 0
        store.unlink()  # back
        counts = client.wait(sub.batch_id, timeout=180)
    assert counts.by_status == {"done": 8}, counts.by_status
    assert _attempts(tmp_path, sub.batch_id) == [("done", 1)] * 8
    assert len(list((store / "batches" / sub.batch_id).iterdir())) == 8


@pytest.mark.slow
def test_an_object_store_away_for_good_fails_the_jobs_with_the_real_reason(
    tmp_path, redis_server, tiny_sd, start_worker
):
    store = tmp_path / "store"
    store.write_text("not a folder: every write fails\n")
    env = _env(tmp_path, redis_server.url, store_url=str(store), batch_size="4",
               transient_retry_seconds="4")  # fmt: skip
    with _client(env) as client:
        sub = _generate(client, tiny_sd, 4)
        start_worker(env)
        counts = client.wait(sub.batch_id, timeout=120)
        reasons = client.failures(sub.batch_id)
    assert counts.by_status == {"failed": 4}, counts.by_status
    (group,) = reasons.groups  # one kind of failure over the four jobs
    assert group.jobs == 4 and group.kind.startswith("object store: cannot write in "), group
    for reason in (e.error for e in group.examples):
        assert "(object batches/" in reason, reason
        assert "Not a directory" in reason or "File exists" in reason
    assert _attempts(tmp_path, sub.batch_id) == [("failed", 1)] * 4
