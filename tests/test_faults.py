"""Fault injection against real processes: a real Redis, real `pixelmill worker` processes,
real SQLite. Each test ends with every job done or failed with a reason, and exactly one
result per done job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from PIL import Image

from pixelmill.producer import Client
from pixelmill.settings import load_settings
from tests.conftest import PHOTOS, pixelmill, pixelmill_env, skimage_data

pytestmark = pytest.mark.slow
T = TypeVar("T")

# Short leases so that recovery happens within a test's patience.
FAST = {"lease_seconds": "4", "queued_lease_seconds": "3", "reconcile_interval": "1",
        "max_attempts": "3"}  # fmt: skip


def _inputs(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(skimage_data() / name).convert("RGB") for name in PHOTOS]
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.jpg"
        sources[i % len(sources)].save(path, quality=85)
        paths.append(str(path))
    return paths


def _env(tmp_path: Path, redis_url: str, **extra: str) -> dict[str, str]:
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    return pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_url,
                         database_url=db, **FAST, **extra)  # fmt: skip


def _client(env: dict[str, str]) -> Client:
    settings = load_settings(**{k[len("PIXELMILL_"):].lower(): v for k, v in env.items()
                                if k.startswith("PIXELMILL_")})  # fmt: skip
    return Client(settings)


def _one_result_per_done_job(tmp_path: Path, batch: str) -> tuple[int, int]:
    db = sqlite3.connect(tmp_path / "jobs.db")
    done, failed = (db.execute("SELECT count(*) FROM jobs WHERE batch_id=? AND status=?",
                               (batch, s)).fetchone()[0] for s in ("done", "failed"))  # fmt: skip
    results = db.execute(
        "SELECT count(*), count(DISTINCT r.job_id) FROM results r JOIN jobs j ON j.id=r.job_id "
        "WHERE j.batch_id=?",
        (batch,),
    ).fetchone()
    db.close()
    assert results == (done, done)
    return done, failed


def _until(check: Callable[[], T], what: str, timeout: float = 120) -> T:
    """Poll ``check`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def _holders(tmp_path: Path, batch: str) -> set[int]:
    """PIDs of the worker processes holding the batch's running jobs (holder: node/pid)."""
    db = sqlite3.connect(tmp_path / "jobs.db")
    rows = db.execute("SELECT DISTINCT worker FROM jobs WHERE batch_id=? AND status='running'",
                      (batch,)).fetchall()  # fmt: skip
    db.close()
    return {int(w.rsplit("/", 1)[1]) for (w,) in rows if w and "/" in w}


def test_sigkill_mid_batch_comes_back_through_the_reconciler(tmp_path, redis_server,
                                                               start_worker):  # fmt: skip
    env = _env(tmp_path, redis_server.url, batch_size="16")
    paths = _inputs(tmp_path / "in", 96)
    with _client(env) as client:
        sub = client.submit("classify", paths)
        start_worker(env)
        pids = _until(lambda: _holders(tmp_path, sub.batch_id), "no job ever ran")
        killed = pids.pop()
        os.kill(killed, signal.SIGKILL)  # mid-batch: its jobs are running
        killed_at = time.monotonic()
        counts = client.wait(sub.batch_id, timeout=120)
        recovered_in = time.monotonic() - killed_at
    assert counts.by_status == {"done": 96}, counts.by_status
    assert recovered_in < 120
    assert _one_result_per_done_job(tmp_path, sub.batch_id) == (96, 0)
    db = sqlite3.connect(tmp_path / "jobs.db")
    (retried,) = db.execute("SELECT count(*) FROM jobs WHERE attempts > 1").fetchone()
    db.close()
    assert retried >= 1  # the killed worker's jobs ran again


def test_a_wiped_redis_loses_messages_but_not_jobs(tmp_path, redis_server, start_worker):
    env = _env(tmp_path, redis_server.url)
    paths = _inputs(tmp_path / "in", 24)
    with _client(env) as client:
        sub = client.submit("classify", paths)  # committed and enqueued, no worker yet
        redis_server.client().flushall()  # the messages are gone
        start_worker(env)
        counts = client.wait(sub.batch_id, timeout=120)
    assert counts.by_status == {"done": 24}
    assert _one_result_per_done_job(tmp_path, sub.batch_id) == (24, 0)


def test_an_input_that_kills_every_worker_fails_after_max_attempts(tmp_path, redis_server,
                                                                   start_worker):  # fmt: skip
    # The crash is injected at the decoder edge, in the real worker processes: any image
    # whose name holds "crashme" ends the process at once, as a native crash would.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os
        import pixelmill.models.images as images

        _decode = images.decode_image

        def decode_image(path, **kwargs):
            if "crashme" in str(path):
                os._exit(70)
            return _decode(path, **kwargs)

        images.decode_image = decode_image
    """)
    )
    env = _env(tmp_path, redis_server.url, batch_size="8")
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env.get('PYTHONPATH', '')}"
    paths = _inputs(tmp_path / "in", 15)
    crasher = tmp_path / "in" / "crashme.jpg"
    shutil.copy(paths[0], crasher)
    with _client(env) as client:
        sub = client.submit("classify", [*paths[:7], str(crasher), *paths[7:]])
        start_worker(env)
        counts = client.wait(sub.batch_id, timeout=240)
        reasons = client.failures(sub.batch_id)
    assert counts.by_status == {"done": 15, "failed": 1}, counts.by_status
    ((group,),) = [reasons.groups]
    assert group.jobs == 1 and "gave up after 3 attempts" in group.kind, group
    assert [e.input for e in group.examples] == [str(crasher)]
    assert _one_result_per_done_job(tmp_path, sub.batch_id) == (15, 1)
    status = pixelmill("status", sub.batch_id, env=env)
    assert "gave up after 3 attempts" in status.stdout


def test_retry_runs_failed_jobs_again(tmp_path, redis_server, start_worker):
    env = _env(tmp_path, redis_server.url)
    paths = _inputs(tmp_path / "in", 4)
    broken = tmp_path / "in" / "later.jpg"
    broken.write_bytes(b"not yet an image")
    with _client(env) as client:
        sub = client.submit("classify", [*paths, str(broken)])
        start_worker(env)
        assert client.wait(sub.batch_id, timeout=120).by_status == {"done": 4, "failed": 1}
        shutil.copy(paths[0], broken)  # the file is fixed in place
        out = pixelmill("retry", sub.batch_id, "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert '"retried": 1' in out.stdout
        assert client.wait(sub.batch_id, timeout=120).by_status == {"done": 5}
    assert _one_result_per_done_job(tmp_path, sub.batch_id) == (5, 0)


def test_sigterm_mid_batch_drains_and_a_new_worker_finishes(tmp_path, redis_server, start_worker):
    env = _env(tmp_path, redis_server.url, batch_size="8")
    paths = _inputs(tmp_path / "in", 64)
    with _client(env) as client:
        sub = client.submit("classify", paths)
        worker = start_worker(env)
        _until(lambda: _holders(tmp_path, sub.batch_id), "no job ever ran")
        worker.send_signal(signal.SIGTERM)  # a deploy: drain
        assert worker.wait(120) == 0
        drained = client.status(sub.batch_id)
        assert drained.by_status.get("running", 0) == 0, drained.by_status  # none left hanging
        start_worker(env)
        counts = client.wait(sub.batch_id, timeout=120)
    assert counts.by_status == {"done": 64}
    assert _one_result_per_done_job(tmp_path, sub.batch_id) == (64, 0)


@pytest.mark.postgres
def test_postgres_down_for_a_while_mid_run(tmp_path, redis_server, postgres_server, start_worker):
    db = postgres_server.create_database("faults_pg_down")
    env = pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_server.url,
                        database_url=db, batch_size="8", **FAST)  # fmt: skip
    paths = _inputs(tmp_path / "in", 64)
    with _client(env) as client:
        sub = client.submit("classify", paths)
        start_worker(env)
        _until(lambda: client.status(sub.batch_id).by_status.get("done", 0) >= 8,
               "nothing finished")  # fmt: skip
        postgres_server.halt()
        try:
            time.sleep(5)  # the workers' claims, writes and heartbeats fail meanwhile
        finally:
            postgres_server.start()
        try:
            counts = client.wait(sub.batch_id, timeout=240)
        except TimeoutError:  # say where each unfinished job stands, and when
            with client.engine.connect() as conn:
                left = conn.exec_driver_sql(
                    "SELECT seq, status, lease_until, worker, attempts, now() FROM jobs "
                    "WHERE status NOT IN ('done', 'failed', 'cancelled') ORDER BY seq"
                ).all()  # fmt: skip
            raise AssertionError(f"unfinished after 240 s: {left}") from None
        rows = list(client.results(sub.batch_id))
    assert counts.by_status == {"done": 64}, counts.by_status
    assert len({r.job for r in rows}) == 64 and all(r.result for r in rows)


def test_object_store_failing_for_a_while(tmp_path, redis_server, s3_server, tiny_sd,
                                          start_worker):  # fmt: skip
    bucket = s3_server.create_bucket("pm-faults-store")
    env = _env(tmp_path, redis_server.url, store_url=f"s3://{bucket}/art",
               s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region,
               s3_access_key_id=s3_server.access_key,
               s3_secret_access_key=s3_server.secret_key, s3_timeout="1")  # fmt: skip
    with _client(env) as client:
        s3_server.pause()  # every write times out until it resumes
        try:
            sub = client.submit("generate", prompts=["a lighthouse"], count=8, seed=1,
                                model=str(tiny_sd),
                                options={"steps": 2, "width": 32, "height": 32})  # fmt: skip
            start_worker(env)
            time.sleep(8)
            assert client.status(sub.batch_id).by_status.get("done", 0) == 0
        finally:
            s3_server.resume()
        counts = client.wait(sub.batch_id, timeout=180)
        rows = list(client.results(sub.batch_id))
    assert counts.by_status == {"done": 8}, counts.by_status
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    recorded = {r.artifact.key for r in rows if r.artifact}
    assert keys == {f"art/{k}" for k in recorded} and len(keys) == 8  # none orphaned or doubled
    assert _one_result_per_done_job(tmp_path, sub.batch_id) == (8, 0)


def test_uploaded_inputs_wait_for_a_store_that_is_away_for_a_while(
    tmp_path, redis_server, s3_server, start_worker
):
    """The store holding the inputs (--upload) stops under a worker that claimed their jobs,
    and comes back (answering errors while it starts): the fetches are tried again in place,
    and every job is done, none failed for the store's moment away (found by the soak)."""
    bucket = s3_server.create_bucket("pm-faults-inputs")
    env = _env(tmp_path, redis_server.url, store_url=f"s3://{bucket}/store", batch_size="4",
               s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region,
               s3_access_key_id=s3_server.access_key,
               s3_secret_access_key=s3_server.secret_key, s3_timeout="1")  # fmt: skip
    paths = _inputs(tmp_path / "in", 12)
    with _client(env) as client:
        sub = client.submit("classify", paths, model="null", upload=True)
        s3_server.stop()
        try:
            start_worker(env)
            _until(lambda: client.status(sub.batch_id).by_status.get("running"),
                   "no job was claimed")  # fmt: skip
        finally:
            s3_server.start()
        counts = client.wait(sub.batch_id, timeout=180)
    assert counts.by_status == {"done": 12}, (counts.by_status, client.failures(sub.batch_id))


def test_producer_killed_midway_through_10000_inputs(tmp_path, redis_server, start_worker):
    """The producer dies after committing its jobs and sending one of its window's 4
    messages: the workers' top-ups carry the batch on, the reconciler sends the 3 lost ones
    again; the same submit again finds the same batch and does nothing twice."""
    folder = tmp_path / "many"
    (first,) = _inputs(tmp_path / "one", 1)
    folder.mkdir()
    for i in range(10000):
        os.link(first, folder / f"img{i:05d}.jpg")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os
        from celery.app import base

        _send = base.Celery.send_task
        sent = [0]

        def send_task(self, *args, **kwargs):
            sent[0] += 1
            if sent[0] > 1:  # of the window's 4 messages
                os._exit(137)
            return _send(self, *args, **kwargs)

        base.Celery.send_task = send_task
    """)
    )
    env = _env(tmp_path, redis_server.url)
    killed = pixelmill("submit", "classify", str(folder), "--model", "null", "--json",
                       env={**env, "PYTHONPATH": str(hook)})  # fmt: skip
    assert killed.returncode == 137
    db = sqlite3.connect(tmp_path / "jobs.db")
    ((batch, total),) = db.execute("SELECT id, total FROM batches").fetchall()
    db.close()
    assert total == 10000  # committed before the first message
    start_worker(env)
    with _client(env) as client:
        counts = client.wait(batch, timeout=180)
    assert counts.by_status == {"done": 10000}
    again = pixelmill("submit", "classify", str(folder), "--model", "null", "--json", env=env)
    assert again.returncode == 0, again.stderr
    found = json.loads(again.stdout)
    assert (found["batch"], found["jobs"], found["existing"]) == (batch, 10000, True)
    db = sqlite3.connect(tmp_path / "jobs.db")
    assert db.execute("SELECT count(*) FROM batches").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (10000,)
    db.close()
    assert _one_result_per_done_job(tmp_path, batch) == (10000, 0)
    fresh = pixelmill("submit", "classify", str(folder), "--model", "null", "--again",
                      "--json", env=env)  # fmt: skip
    assert json.loads(fresh.stdout)["batch"] != batch


def test_redis_that_lost_its_data_mid_run_gets_every_queued_job_again_at_once(
    tmp_path, spawn, null_gate
):
    """Redis restarted without persistence under running workers: every message is gone. The
    database is the record: the reconciler sees the broker's epoch change and enqueues every
    queued job again at its next pass (not after PIXELMILL_QUEUED_LEASE_SECONDS, an hour
    here), once for the fleet; each job ends done once, and no device worker dies of it."""
    from tests.services import start_redis

    server = start_redis(tmp_path / "redis", persistent=False)
    log = tmp_path / "worker.log"
    try:
        env = {**_env(tmp_path, server.url, batch_size="4"), **null_gate.env,
               "PIXELMILL_QUEUED_LEASE_SECONDS": "3600"}  # fmt: skip
        paths = _inputs(tmp_path / "in", 64)
        # Enough for one message of 4 to finish however the items spread over the messages in
        # flight (2 CPU workers x pipeline depth 2 = 4 messages: 4 x 3 + 1); the rest wait.
        null_gate.allow(13)
        with _client(env) as client, log.open("wb") as out:
            sub = client.submit("classify", paths, model="null")
            worker = spawn("worker", "--devices", "cpu", "--cpu-workers", "2", env=env,
                           stderr=out)  # fmt: skip
            _until(lambda: client.status(sub.batch_id).by_status.get("done", 0) >= 4,
                   "nothing finished")  # fmt: skip
            before = _until(lambda: _epoch(server), "no reconciler pass")
            server.restart()  # every message lost, the held ones' acks go nowhere
            # Empty when it came back (the workers reconnect at once and write their keys, so
            # what is checked is that the epoch they find is not the one before).
            assert _epoch(server) != before
            null_gate.open()
            counts = client.wait(sub.batch_id, timeout=180)
            assert counts.by_status == {"done": 64}, counts.by_status
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
        assert _one_result_per_done_job(tmp_path, sub.batch_id) == (64, 0)
        text = log.read_text()
        assert text.count("the broker lost its data") == 1, text[-3000:]
        assert "Unrecoverable error" not in text and "exited with" not in text, text[-3000:]
    finally:
        server.stop()


def _epoch(server: Any) -> bytes | None:
    from pixelmill.wire import EPOCH_KEY

    return server.client().get(EPOCH_KEY)  # type: ignore[no-any-return]


def test_redis_restarted_mid_run_with_persistence(tmp_path, start_worker):
    from tests.services import start_redis

    server = start_redis(tmp_path / "redis", persistent=True)
    try:
        env = _env(tmp_path, server.url, batch_size="8")
        paths = _inputs(tmp_path / "in", 64)
        with _client(env) as client:
            sub = client.submit("classify", paths)
            worker = start_worker(env)
            _until(lambda: client.status(sub.batch_id).by_status.get("done", 0) >= 8,
                   "nothing finished")  # fmt: skip
            server.restart()  # the workers lose the broker mid-run, then reconnect
            counts = client.wait(sub.batch_id, timeout=180)
        assert counts.by_status == {"done": 64}, counts.by_status
        assert _one_result_per_done_job(tmp_path, sub.batch_id) == (64, 0)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        server.stop()
