"""A batch's window: the broker holds a few of its messages, the database the rest.

On SQLite and PostgreSQL (the ``sessions`` fixture): a new batch leases only its first window;
a claim tops its window up in whole messages, in submit order, never twice; pause, cancel,
resume, priority and retry act on the window; and a queue worked first in, first out with
those top-ups shares the workers between batches by their shares (a small batch submitted
behind a big one is done within a few messages, not after the big one). Against a real Redis
and real processes: the queue's length stays at the window while a 2,000-job batch runs, a top-up
lost to a worker's death is sent again by the reconciler, and a small batch overtakes a big one
of the same priority on a `pixelmill worker`.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select, update

from pixelmill.db.control import cancel_batch, pause_batch, resume_batch, set_priority
from pixelmill.db.jobs import (
    claim_jobs,
    create_batch,
    requeue_failed,
    take_stranded,
    write_outcomes,
)
from pixelmill.db.reads import batch_counts
from pixelmill.db.records import Outcome
from pixelmill.db.schema import Job, JobStatus
from pixelmill.db.window import Window, open_window, stalled, top_up
from pixelmill.producer import Client
from pixelmill.settings import load_settings
from pixelmill.wire import create_app, enqueue, queue_length
from pixelmill.worker.reconciler import Reconciler
from tests.conftest import pixelmill_env

SIZE = 4  # jobs per message in these tests


def _batch(sessions: Any, n: int, *, window: int = 2, **kw: Any) -> Any:
    with sessions.begin() as s:
        return create_batch(s, task="classify", model="m", message_size=SIZE, window=window,
                            inputs=[f"/in/{i}.jpg" for i in range(n)], **kw)  # fmt: skip


def _seqs(sessions: Any, job_ids: list[str]) -> list[int]:
    with sessions() as s:
        found = dict(s.execute(select(Job.id, Job.seq).where(Job.id.in_(job_ids))).all())
    return [found[j] for j in job_ids]


def _windowed(sessions: Any, batch_id: str) -> int:
    """The batch's queued jobs with a message (a lease)."""
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == batch_id, Job.status == JobStatus.queued,
            Job.lease_until.is_not(None))) or 0)  # fmt: skip


def _claim(sessions: Any, job_ids: list[str], window: int = 2) -> tuple[list[str], list[Window]]:
    """What a worker does with a message: claim its jobs, top up their batches' windows."""
    with sessions.begin() as s:
        claimed = claim_jobs(s, job_ids, worker="w/1", device="cpu")
        windows = top_up(s, {c.batch_id for c in claimed}, window=window, lease=600)
    return [c.job_id for c in claimed], windows


def test_a_batch_sends_its_first_window_and_keeps_the_rest_in_the_database(sessions):
    new = _batch(sessions, 100, window=2)
    assert new.queued == 100
    assert _seqs(sessions, new.job_ids) == list(range(8))  # 2 messages of 4, in order
    assert _windowed(sessions, new.batch_id) == 8
    # Without a window (a caller that enqueues every job itself): all of them, as before.
    whole = _batch(sessions, 10, window=None)  # type: ignore[arg-type]
    assert len(whole.job_ids) == whole.queued == 10
    shared = _batch(sessions, 100, window=2, share=3)
    assert len(shared.job_ids) == 24  # share 3: three times the messages


def test_a_claim_tops_the_window_up_in_whole_messages_in_order_and_never_twice(sessions):
    new = _batch(sessions, 30, window=2)
    first, second = new.job_ids[:4], new.job_ids[4:]
    claimed, windows = _claim(sessions, first)
    pending = list(windows[0].job_ids)  # the messages on the queue, in order
    assert claimed == first
    assert len(windows) == 1 and windows[0].batch_id == new.batch_id
    assert (windows[0].size, windows[0].priority) == (SIZE, "normal")
    assert _seqs(sessions, windows[0].job_ids) == [8, 9, 10, 11]
    assert _windowed(sessions, new.batch_id) == 8
    # The same message again (a redelivery): nothing claimed, nothing sent.
    assert _claim(sessions, first) == ([], [])
    # Two of a message's jobs: the window is two short, which waits for a whole message.
    claimed, windows = _claim(sessions, second[:2])
    assert (claimed, windows) == (second[:2], [])
    claimed, windows = _claim(sessions, second[2:])
    assert [_seqs(sessions, w.job_ids) for w in windows] == [[12, 13, 14, 15]]
    # To the end of the backlog: the last message is short, then nothing is left to send.
    sent = pending + [j for w in windows for j in w.job_ids]
    while sent:
        _, windows = _claim(sessions, sent[:4])
        sent = sent[4:] + [j for w in windows for j in w.job_ids]
    with sessions() as s:
        left = s.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == new.batch_id, Job.status == JobStatus.queued))  # fmt: skip
    assert left == 0  # every job was sent, and claimed, once


def test_pause_cancel_resume_priority_and_retry_act_on_the_window(sessions):
    new = _batch(sessions, 40, window=2)
    with sessions.begin() as s:
        assert pause_batch(s, new.batch_id)
    # A paused batch's message claims nothing and sends nothing.
    assert _claim(sessions, new.job_ids[:4]) == ([], [])
    with sessions.begin() as s:
        again = resume_batch(s, new.batch_id, window=2)
    assert again == new.job_ids  # the window's messages are sent again, nothing more
    with sessions.begin() as s:
        moved = set_priority(s, new.batch_id, "high", window=2)
    assert moved == new.job_ids
    with sessions.begin() as s:
        assert open_window(s, new.batch_id, window=2, lease=60).priority == "high"
    # Claimed, then failed: a retry puts them in the backlog and sends a window.
    claimed, _ = _claim(sessions, new.job_ids)
    with sessions.begin() as s:
        write_outcomes(s, [Outcome(job_id=j, error="broken", model="m") for j in claimed])
    with sessions.begin() as s:
        sent = requeue_failed(s, new.batch_id, window=2)
    assert len(sent) == 8 and _windowed(sessions, new.batch_id) == 8
    with sessions.begin() as s:
        assert cancel_batch(s, new.batch_id) > 0
        assert open_window(s, new.batch_id, window=2, lease=60).job_ids == []
    assert _claim(sessions, sent) == ([], [])


def test_a_cancel_in_chunks_acts_at_its_first_commit_and_one_left_halfway_is_finished(sessions):
    new = _batch(sessions, 50, window=2)
    with sessions.begin() as s:
        assert cancel_batch(s, new.batch_id, seqs=range(0, 10)) == 10
    # The caller died there: 40 jobs still queued, but no worker starts one.
    assert _claim(sessions, new.job_ids) == ([], [])
    with sessions.begin() as s:  # the reconciler's pass over queued jobs ends the rest
        assert take_stranded(s, status=JobStatus.queued, lease=60) == []
    with sessions() as s:
        assert batch_counts(s, new.batch_id).by_status == {"cancelled": 50}


def _queue(*batches: Any) -> collections.deque[tuple[str, list[str]]]:
    """The messages the batches' submits sent, in order, as the broker holds them."""
    queue: collections.deque[tuple[str, list[str]]] = collections.deque()
    for b in batches:
        queue.extend((b.batch_id, b.job_ids[i : i + SIZE]) for i in range(0, len(b.job_ids), SIZE))
    return queue


def _work(sessions: Any, queue: collections.deque[tuple[str, list[str]]], messages: int,
          until: Callable[[], bool] = lambda: False) -> list[str]:  # fmt: skip
    """Take ``messages`` messages off ``queue`` first in, first out, as the broker hands them
    out: each is claimed and done, and its top-up goes to the back. Returns whose each was."""
    taken: list[str] = []
    while len(taken) < messages and queue and not until():
        batch_id, job_ids = queue.popleft()
        claimed, windows = _claim(sessions, job_ids)
        with sessions.begin() as s:
            write_outcomes(s, [Outcome(job_id=j, result={}, model="m") for j in claimed])
        taken.append(batch_id)
        for w in windows:
            queue.extend((w.batch_id, w.job_ids[i : i + w.size])
                         for i in range(0, len(w.job_ids), w.size))  # fmt: skip
    return taken


def _queued(sessions: Any, batch_id: str) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == batch_id, Job.status.in_(["queued", "running"]))) or 0)  # fmt: skip


def test_a_small_batch_behind_a_big_one_waits_for_its_window_not_its_backlog(sessions):
    big = _batch(sessions, 2000)  # 500 messages, 2 of them on the queue
    queue = _queue(big)
    assert _work(sessions, queue, 3) == [big.batch_id] * 3 and len(queue) == 2
    small = _batch(sessions, 20)  # 5 messages, the first 2 on the queue behind the big's
    queue.extend(_queue(small))
    order = _work(sessions, queue, 100, until=lambda: _queued(sessions, small.batch_id) == 0)
    # The 2 big messages ahead of it, then the two batches in turn: 11 messages, not 502.
    b, s = big.batch_id, small.batch_id
    assert order == [b, b, s, s, b, b, s, s, b, b, s], order
    assert len(queue) == 2  # the big batch's window, as before; the small batch left none


def test_batches_of_one_priority_get_turns_in_proportion_to_their_share(sessions):
    one = _batch(sessions, 1000)
    two = _batch(sessions, 1000, share=2)
    queue = _queue(one, two)
    assert len(queue) == 2 + 4
    order = _work(sessions, queue, 90)
    assert (order.count(one.batch_id), order.count(two.batch_id)) == (30, 60)


# ---- a real Redis ------------------------------------------------------------------------


def _bodies(redis_server: Any, queue: str) -> list[list[str]]:
    """The job ids of each normal-priority message on ``queue`` (Celery's JSON envelope on
    the priority's Redis list), first in first (kombu pushes on the left, pops on the right)."""
    raw = redis_server.client()
    out = []
    for item in reversed(raw.lrange(f"{queue}\x06\x163", 0, -1)):
        body = json.loads(base64.b64decode(json.loads(item)["body"]))
        out.append(body[0][0])
    return out


def test_a_top_up_lost_with_its_worker_is_sent_again_by_the_reconciler(sessions, redis_server):
    """A worker committed its claim and the batch's next message, then died before sending
    it: the jobs are leased in the window with no message. Once the lease is over and the
    queue is empty, the reconciler sends them (once); the backlog stays where it is."""
    new = _batch(sessions, 12, window=1, queued_lease=0)
    with sessions.begin() as s:  # the claim, and its top-up, never sent
        claim_jobs(s, new.job_ids, worker="dead/1", device="cpu")
        (lost,) = top_up(s, [new.batch_id], window=1, lease=0)
    assert _seqs(sessions, lost.job_ids) == [4, 5, 6, 7]
    queue = "q-" + uuid.uuid4().hex[:8]
    settings = load_settings(broker_url=redis_server.url, queue=queue,
                             database_url="sqlite:///unused.db")  # fmt: skip
    app = create_app(settings)
    reconciler = Reconciler(settings, sessions, app)
    assert reconciler.run_once() == 4
    assert _bodies(redis_server, queue) == [lost.job_ids]
    assert reconciler.run_once() == 0  # leased again: sent once
    assert _windowed(sessions, new.batch_id) == 4  # the backlog (8..11) has no message yet


def test_a_quiet_batchs_window_is_sent_again_while_other_work_keeps_the_queue_busy(
    sessions, redis_server
):
    """The producer died between its commit and its send: the batch's window has no message.
    Another batch keeps the queue from emptying (the reconciler's per-job path waits for an
    empty queue): once the quiet batch's leases are over, its window is sent again, once per
    lease; a paused batch's window is left alone."""
    quiet = _batch(sessions, 12, window=1, queued_lease=0)  # sent nothing; leases over
    paused = _batch(sessions, 12, window=1, queued_lease=0)
    with sessions.begin() as s:
        pause_batch(s, paused.batch_id)
    queue = "q-" + uuid.uuid4().hex[:8]
    settings = load_settings(broker_url=redis_server.url, queue=queue, queued_lease_seconds=600,
                             window=1,
                             database_url="sqlite:///unused.db")  # fmt: skip
    app = create_app(settings)
    busy = _batch(sessions, 40, window=1)  # its message is on the queue, leased
    enqueue(app, busy.job_ids, SIZE, "normal")
    reconciler = Reconciler(settings, sessions, app)
    assert reconciler.run_once() == 4
    assert _bodies(redis_server, queue) == [busy.job_ids, quiet.job_ids]
    assert reconciler.run_once() == 0  # leased again for PIXELMILL_QUEUED_LEASE_SECONDS


def test_a_batch_left_with_a_backlog_and_no_window_gets_its_window_again(sessions):
    """Every job with a message ended without a claim topping the window up (the reconciler
    took them back from a worker that then finished them itself; a claim had counted them as
    held): the backlog has no message. The reconciler's pass opens the window again, once; a
    paused batch in the same state is left alone."""
    new = _batch(sessions, 20)  # window: the first 8 jobs (2 messages of 4), 12 in backlog
    paused = _batch(sessions, 20)
    with sessions.begin() as s:
        pause_batch(s, paused.batch_id)
        s.execute(update(Job).where(Job.id.in_(new.job_ids + paused.job_ids))
                  .values(status=JobStatus.done, lease_until=None))  # fmt: skip
    with sessions.begin() as s:
        found = stalled(s, window=2, lease=600)
    assert [w.batch_id for w in found] == [new.batch_id]
    assert _seqs(sessions, found[0].job_ids) == list(range(8, 16))
    with sessions.begin() as s:
        assert stalled(s, window=2, lease=600) == []  # it has a window again


def test_a_message_a_dead_worker_took_unclaimed_comes_back_while_its_batch_moves_on(
    sessions, redis_server
):
    """A worker took the batch's first message off the queue and died before claiming it;
    the batch's second message was claimed by another (which topped the window up). Once
    the first message's lease is over, its jobs are sent again, though the queue is busy
    and the batch's window is fresh."""
    new = _batch(sessions, 20, window=2)
    claimed, windows = _claim(sessions, new.job_ids[4:8])  # the second message
    with sessions.begin() as s:  # the first one's lease is over
        s.execute(update(Job).where(Job.id.in_(new.job_ids[:4]))
                  .values(lease_until=datetime(2000, 1, 1, tzinfo=UTC)))  # fmt: skip
    queue = "q-" + uuid.uuid4().hex[:8]
    settings = load_settings(broker_url=redis_server.url, queue=queue, window=2,
                             database_url="sqlite:///unused.db")  # fmt: skip
    app = create_app(settings)
    enqueue(app, windows[0].job_ids, SIZE, "normal")  # the top-up, waiting
    reconciler = Reconciler(settings, sessions, app)
    assert reconciler.run_once() == 4
    assert _bodies(redis_server, queue) == [windows[0].job_ids, new.job_ids[:4]]
    assert reconciler.run_once() == 0


# ---- real processes ----------------------------------------------------------------------


def _env(tmp_path: Path, redis_url: str, **extra: str) -> dict[str, str]:
    return pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_url,
                         database_url=f"sqlite:///{tmp_path / 'jobs.db'}", batch_size=str(SIZE),
                         window="4", queue="q-" + uuid.uuid4().hex[:8], **extra)  # fmt: skip


def _client(env: dict[str, str]) -> Client:
    settings = load_settings(**{k[len("PIXELMILL_"):].lower(): v for k, v in env.items()
                                if k.startswith("PIXELMILL_")})  # fmt: skip
    return Client(settings)


def _inputs(folder: Path, n: int) -> list[str]:
    """``n`` inputs, hard links of one small image (the null model reads each)."""
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "img00000.png"
    Image.new("RGB", (8, 8), (10, 40, 90)).save(first)
    for i in range(1, n):
        os.link(first, folder / f"img{i:05d}.png")
    return [str(folder / f"img{i:05d}.png") for i in range(n)]


def _db(tmp_path: Path, sql: str, *args: Any) -> list[Any]:
    with sqlite3.connect(tmp_path / "jobs.db", timeout=30) as db:
        return db.execute(sql, args).fetchall()


def _until(check: Callable[[], Any], what: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def _done_once(tmp_path: Path, batch: str, n: int) -> None:
    """Every job of the batch done, with one result each."""
    assert _db(tmp_path, "SELECT status, count(*) FROM jobs WHERE batch_id=? GROUP BY status",
               batch) == [("done", n)]  # fmt: skip
    assert _db(tmp_path, "SELECT count(*), count(DISTINCT r.job_id) FROM results r JOIN jobs j "
               "ON j.id = r.job_id WHERE j.batch_id=?", batch) == [(n, n)]  # fmt: skip


@pytest.mark.slow
def test_the_queue_holds_the_window_while_a_2000_job_batch_runs(tmp_path, redis_server,
                                                                 spawn, null_gate):  # fmt: skip
    env = {**_env(tmp_path, redis_server.url), **null_gate.env}
    paths = _inputs(tmp_path / "in", 2000)
    with _client(env) as client:
        sub = client.submit("classify", paths, model="null")
        queue = client.settings.queue
        assert (sub.jobs, sub.queued) == (2000, 2000)
        assert queue_length(client.app, queue) == 4  # PIXELMILL_WINDOW: 4 messages of 4
        spawn("worker", "--devices", "cpu", "--cpu-workers", "2", env=env)
        # Each of the 2 workers holds 2 messages (its pipeline); each claim sent the next.
        _until(lambda: client.status(sub.batch_id).by_status.get("running") == 16,
               "the workers never held 4 messages")  # fmt: skip
        # A claim's top-up goes out just after its commit: wait for the last one.
        _until(lambda: queue_length(client.app, queue) == 4, "the window was never refilled")
        null_gate.open()
        longest = 0
        while not client.status(sub.batch_id).complete:
            longest = max(longest, queue_length(client.app, queue))
            time.sleep(0.02)
        assert longest <= 4, longest
        assert queue_length(client.app, queue) == 0  # nothing left to drain
    _done_once(tmp_path, sub.batch_id, 2000)
    assert _db(tmp_path, "SELECT max(attempts) FROM jobs") == [(1,)]  # each ran once


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_and_doubles_no_job(tmp_path, redis_server, spawn,
                                                          null_gate):  # fmt: skip
    """SIGKILL a device worker while it holds messages (claimed, and maybe one reserved but
    not claimed): its running jobs come back after their lease, the reserved message's jobs
    after their queued lease, the top-ups it sent carry on, and no job runs twice but the
    ones it held."""
    env = {**_env(tmp_path, redis_server.url, lease_seconds="4", queued_lease_seconds="5",
                  reconcile_interval="1", max_attempts="3"), **null_gate.env}  # fmt: skip
    paths = _inputs(tmp_path / "in", 600)
    null_gate.allow(100)
    with _client(env) as client:
        sub = client.submit("classify", paths, model="null")
        spawn("worker", "--devices", "cpu", "--cpu-workers", "2", env=env)
        _until(null_gate.waiting, "the gate's items were never taken")
        holders = _until(lambda: _db(tmp_path, "SELECT DISTINCT worker FROM jobs WHERE "
                                     "status='running'"), "nothing held")  # fmt: skip
        victim = holders[0][0]
        os.kill(int(victim.rsplit("/", 1)[1]), signal.SIGKILL)
        held = {j for (j,) in _db(tmp_path, "SELECT id FROM jobs WHERE worker=?", victim)}
        null_gate.open()
        counts = client.wait(sub.batch_id, timeout=300)
    assert counts.by_status == {"done": 600}, counts.by_status
    _done_once(tmp_path, sub.batch_id, 600)
    again = {j for (j,) in _db(tmp_path, "SELECT id FROM jobs WHERE attempts > 1")}
    assert again <= held, again - held


@pytest.mark.slow
def test_a_small_batch_overtakes_a_big_one_of_the_same_priority(tmp_path, redis_server, spawn,
                                                                null_gate):  # fmt: skip
    """One worker busy with a 2,000-job batch; a 20-job batch submitted behind it at the same
    priority finishes after the big batch's window and a few turns, not after its 2,000."""
    env = {**_env(tmp_path, redis_server.url), **null_gate.env}
    with _client(env) as client:
        big = client.submit("classify", _inputs(tmp_path / "big", 2000), model="null")
        spawn("worker", "--devices", "cpu", "--cpu-workers", "1", env=env)
        _until(null_gate.waiting, "the big batch never started")
        small = client.submit("classify", _inputs(tmp_path / "small", 20), model="null")
        null_gate.open()
        client.wait(small.batch_id, timeout=300)
        (last,) = _db(tmp_path, "SELECT max(finished_at) FROM jobs WHERE batch_id=?",
                      small.batch_id)  # fmt: skip
        (before,) = _db(tmp_path, "SELECT count(*) FROM jobs WHERE batch_id=? AND "
                        "finished_at <= ?", big.batch_id, last[0])  # fmt: skip
        client.wait(big.batch_id, timeout=300)
    # Ahead of it: the worker's 2 messages and the big batch's window of 4; then turns (the
    # small batch's 5 messages against the big one's 5 or so): about 16 of 500 messages.
    assert before[0] <= 4 * 20, before
    _done_once(tmp_path, small.batch_id, 20)
    _done_once(tmp_path, big.batch_id, 2000)


@pytest.mark.slow
def test_pause_and_cancel_of_100000_queued_jobs_take_effect_with_nothing_to_drain(
    tmp_path, redis_server, spawn, null_gate
):
    """A 100,000-job batch with workers on it: pause stops it after the messages the workers
    hold (the window's messages on the queue are taken and claim nothing), cancel ends the
    rest; the queue is empty at once either way, not 25,000 messages later."""
    env = {**_env(tmp_path, redis_server.url), **null_gate.env}
    (path,) = _inputs(tmp_path / "in", 1)
    with _client(env) as client:
        with client.sessions.begin() as s:
            new = create_batch(s, task="classify", model="null", message_size=SIZE, window=4,
                               inputs=[path] * 100_000)  # fmt: skip
        enqueue(client.app, new.job_ids, SIZE, "normal")
        queue = client.settings.queue
        null_gate.allow(40)
        spawn("worker", "--devices", "cpu", "--cpu-workers", "2", env=env)
        _until(null_gate.waiting, "the batch never started")
        _until(lambda: queue_length(client.app, queue) == 4, "the window was never refilled")
        assert client.pause(new.batch_id)
        null_gate.open()
        # The held messages finish; the window's are taken and claim nothing.
        _until(lambda: queue_length(client.app, queue) == 0
               and not client.status(new.batch_id).by_status.get("running"),
               "the paused batch kept running", timeout=120)  # fmt: skip
        done = client.status(new.batch_id).by_status["done"]
        assert done <= 40 + 4 * 4 * 2, done  # what the gate let through, and what was held
        started = time.monotonic()
        assert client.cancel(new.batch_id) == 100_000 - done
        took = time.monotonic() - started
        counts = client.status(new.batch_id)
    assert counts.by_status == {"done": done, "cancelled": 100_000 - done}
    assert queue_length(client.app, queue) == 0
    print(f"cancel of {100_000 - done} queued jobs: {took:.2f} s")
