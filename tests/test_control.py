"""Control over a batch — pause, resume, cancel, priority — from the state functions up to the
command line.

On SQLite and PostgreSQL (the ``sessions`` fixture): what each control function does to the
jobs, that a duplicate message after a resume runs nothing twice, and that a cancelled job
passes the status CHECK constraint. Against a real Redis: messages at each priority land on
their own list and ``queue_lengths`` sums them all. Against real processes (a real Redis, real
`pixelmill worker` and `pixelmill run` processes, SQLite, the ``null`` model): pause holds a
running batch back and resume finishes it with every job done once; cancel ends the queued
jobs cancelled, everywhere counted apart from failed; a high-priority batch overtakes a large
queue of low-priority work within a message or two.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError

from pixelmill.db.control import cancel_batch, pause_batch, resume_batch, set_priority
from pixelmill.db.jobs import (
    claim_jobs,
    create_batch,
    requeue_failed,
    take_stranded,
    write_outcomes,
)
from pixelmill.db.reads import batch_counts, get_batch, iter_batch_jobs
from pixelmill.db.records import Outcome
from pixelmill.db.schema import Job, JobStatus
from pixelmill.errors import InputError, UnknownBatch
from pixelmill.producer import Client
from pixelmill.settings import load_settings
from pixelmill.wire import PRIORITIES, create_app, enqueue, queue_length, queue_lengths
from tests.conftest import MANY_PROCESSES, ROOT, NullGate, pixelmill, pixelmill_env

# ---- the state functions, on SQLite and PostgreSQL ------------------------------------------


def _batch(sessions: Any, n: int = 4, **kw: Any) -> Any:
    with sessions.begin() as s:
        return create_batch(s, task="classify", model="m",
                            inputs=[f"/in/{i}.jpg" for i in range(n)], **kw)  # fmt: skip


def _statuses(sessions: Any, batch_id: str) -> list[str]:
    with sessions() as s:
        return [r.status for r in iter_batch_jobs(s, batch_id)]


def _done(job_ids: list[str]) -> list[Outcome]:
    return [Outcome(job_id=j, result={"x": 1}, model="m", device="cpu") for j in job_ids]


def test_pause_starts_no_queued_job_and_resume_carries_on_once(sessions):
    new = _batch(sessions, 4)
    jobs = new.job_ids
    with sessions.begin() as s:
        assert [c.job_id for c in claim_jobs(s, jobs[:2], worker="w/1", device="cpu")] == jobs[:2]
    with sessions.begin() as s:
        assert pause_batch(s, new.batch_id) is True
    with sessions.begin() as s:
        assert pause_batch(s, new.batch_id) is False  # paused already: nothing changes
        # The batch's messages still arrive: nothing is claimed, queued or running.
        assert claim_jobs(s, jobs, worker="w/2", device="cpu", max_attempts=3) == []
        write_outcomes(s, _done(jobs[:2]))  # the running ones finish
    with sessions() as s:
        counts = batch_counts(s, new.batch_id)
    assert _statuses(sessions, new.batch_id) == ["done", "done", "queued", "queued"]
    assert (counts.state, counts.paused) == ("paused", True)
    with sessions.begin() as s:
        # The reconciler leaves a paused batch's jobs alone, however long they wait.
        s.execute(update(Job).where(Job.batch_id == new.batch_id).values(lease_until=None))
        s.execute(text("UPDATE jobs SET lease_until = :t WHERE status = 'queued'"),
                  {"t": datetime(2000, 1, 1, tzinfo=UTC)})  # fmt: skip
        assert take_stranded(s, status=JobStatus.queued, lease=60) == []
    with sessions.begin() as s:
        again = resume_batch(s, new.batch_id)
    assert again == jobs[2:]  # in order, only what was left
    with sessions.begin() as s:
        assert resume_batch(s, new.batch_id) == []  # not paused any more: nothing to enqueue
    # The first message after the resume runs them; the same ids again (the message that was
    # still on the queue when the batch was paused, a redelivery) find them taken, then done.
    with sessions.begin() as s:
        claimed = claim_jobs(s, again, worker="w/3", device="cpu", max_attempts=3)
        assert [(c.job_id, c.attempts) for c in claimed] == [(j, 1) for j in again]
    with sessions.begin() as s:
        assert claim_jobs(s, again, worker="w/4", device="cpu", max_attempts=3) == []
        write_outcomes(s, _done(again))
    with sessions.begin() as s:
        assert claim_jobs(s, jobs, worker="w/5", device="cpu", max_attempts=3) == []
    with sessions() as s:
        rows = list(iter_batch_jobs(s, new.batch_id))
        counts = batch_counts(s, new.batch_id)
    assert [(r.status, r.attempts) for r in rows] == [("done", 1)] * 4
    assert (counts.state, counts.complete) == ("finished", True)


def test_cancel_ends_queued_jobs_cancelled_and_keeps_what_was_done(sessions):
    new = _batch(sessions, 5)
    jobs = new.job_ids
    with sessions.begin() as s:
        claim_jobs(s, jobs[:2], worker="w/1", device="cpu")
        write_outcomes(s, _done(jobs[:1]))
        claim_jobs(s, jobs[2:3], worker="w/1", device="cpu")
        write_outcomes(s, [Outcome(job_id=jobs[2], error="/in/2.jpg: broken", model="m")])
    with sessions.begin() as s:
        assert cancel_batch(s, new.batch_id) == 2  # the two queued ones
    assert _statuses(sessions, new.batch_id) == ["done", "running", "failed", "cancelled",
                                                 "cancelled"]  # fmt: skip
    with sessions.begin() as s:  # the running one finishes
        write_outcomes(s, _done(jobs[1:2]))
        assert claim_jobs(s, jobs, worker="w/2", device="cpu", max_attempts=3) == []
        assert cancel_batch(s, new.batch_id) == 0  # again: nothing changes
    with sessions() as s:
        counts = batch_counts(s, new.batch_id)
        rows = list(iter_batch_jobs(s, new.batch_id))
        # Read back through the schema's own type on both databases: the CHECK constraint
        # let the new state in.
        stored = s.scalars(select(Job.status).where(Job.id == jobs[4])).one()
    assert stored == JobStatus.cancelled
    assert counts.by_status == {"done": 2, "failed": 1, "cancelled": 2}
    assert (counts.state, counts.complete, counts.finished) == ("cancelled", True, 5)
    assert rows[0].result == {"x": 1} and rows[1].result == {"x": 1}  # done keep their results
    assert rows[3].result is None and rows[3].error == "cancelled by a user"
    assert rows[3].finished_at is not None
    # Terminal: a retry leaves the batch (its failed job too), the other actions refuse it.
    for act in (
        lambda s: requeue_failed(s, new.batch_id),
        lambda s: pause_batch(s, new.batch_id),
        lambda s: resume_batch(s, new.batch_id),
        lambda s: set_priority(s, new.batch_id, "high"),
    ):
        with sessions.begin() as s, pytest.raises(InputError, match=f"{new.batch_id} was cancel"):
            act(s)
    assert _statuses(sessions, new.batch_id) == ["done", "done", "failed", "cancelled",
                                                 "cancelled"]  # fmt: skip


def test_the_status_check_constraint_takes_cancelled_and_refuses_nonsense(sessions):
    new = _batch(sessions, 2)
    with sessions.begin() as s:
        s.execute(text("UPDATE jobs SET status = 'cancelled' WHERE id = :j"), {"j": new.job_ids[0]})
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.execute(text("UPDATE jobs SET status = 'abandoned' WHERE id = :j"), {"j": new.job_ids[1]})
    assert _statuses(sessions, new.batch_id) == ["cancelled", "queued"]


def test_cancelling_a_finished_batch_changes_nothing(sessions):
    new = _batch(sessions, 2)
    with sessions.begin() as s:
        claim_jobs(s, new.job_ids, worker="w/1", device="cpu")
        write_outcomes(s, _done(new.job_ids))
    with sessions.begin() as s:
        assert cancel_batch(s, new.batch_id) == 0
    with sessions() as s:
        counts = batch_counts(s, new.batch_id)
    assert (counts.state, counts.cancelled) == ("finished", False)


def test_pausing_a_batch_with_nothing_queued_changes_nothing_so_retry_runs(sessions):
    new = _batch(sessions, 2)
    with sessions.begin() as s:
        claim_jobs(s, new.job_ids, worker="w/1", device="cpu")
        write_outcomes(s, [*_done(new.job_ids[:1]),
                           Outcome(job_id=new.job_ids[1], error="/in/1.jpg: broken")])  # fmt: skip
    with sessions.begin() as s:
        assert pause_batch(s, new.batch_id) is False  # finished: nothing to hold back
    with sessions.begin() as s:
        assert requeue_failed(s, new.batch_id) == new.job_ids[1:]
    with sessions.begin() as s:  # the retried job is claimable: the batch is not paused
        assert [c.job_id for c in claim_jobs(s, new.job_ids, worker="w/2", device="cpu")] == [
            new.job_ids[1]
        ]


def test_a_cancelled_batchs_job_whose_worker_died_ends_cancelled_not_run_again(sessions):
    new = _batch(sessions, 2, queued_lease=0)
    with sessions.begin() as s:  # lease=0: its holder is as good as dead
        claim_jobs(s, new.job_ids[:1], worker="dead/1", device="cpu", lease=0)
        assert cancel_batch(s, new.batch_id) == 1
    with sessions.begin() as s:
        # A redelivered message takes nothing, and the reconciler enqueues nothing.
        assert claim_jobs(s, new.job_ids, worker="w/2", device="cpu", max_attempts=3) == []
        assert take_stranded(s, status=JobStatus.running, lease=60) == []
    with sessions() as s:
        counts = batch_counts(s, new.batch_id)
    assert counts.by_status == {"cancelled": 2} and counts.complete


def test_set_priority_enqueues_the_queued_jobs_again_unless_paused(sessions):
    new = _batch(sessions, 3)
    with sessions.begin() as s:
        claim_jobs(s, new.job_ids[:1], worker="w/1", device="cpu")
    with sessions.begin() as s:
        assert set_priority(s, new.batch_id, "high") == new.job_ids[1:]
        assert set_priority(s, new.batch_id, "high") == []  # unchanged
        with pytest.raises(InputError, match="high, normal, low"):
            set_priority(s, new.batch_id, "urgent")
    with sessions.begin() as s:
        pause_batch(s, new.batch_id)
        assert set_priority(s, new.batch_id, "low") == []  # its resume enqueues them
    with sessions.begin() as s:
        assert get_batch(s, new.batch_id).priority == "low"
        assert resume_batch(s, new.batch_id) == new.job_ids[1:]
    with sessions() as s:
        assert batch_counts(s, new.batch_id).priority == "low"


def test_every_action_on_an_unknown_batch_names_it(sessions):
    for act in (pause_batch, resume_batch, cancel_batch, requeue_failed,
                lambda s, b: set_priority(s, b, "low")):  # fmt: skip
        with sessions.begin() as s, pytest.raises(UnknownBatch, match="no-such-batch"):
            act(s, "no-such-batch")


def test_the_progress_line_says_paused_and_cancelled_at_once():
    from pixelmill.db.records import BatchCounts
    from pixelmill.producer.output import Progress

    out = io.StringIO()
    progress = Progress(10, enabled=False, every=3600, out=out)

    def counts(**kw: Any) -> BatchCounts:
        by_status = kw.pop("by_status")
        return BatchCounts(batch_id="b", task="classify", model="m", name=None, total=10,
                           by_status=by_status, **kw)  # fmt: skip

    progress.update(counts(by_status={"done": 2, "queued": 8}))
    assert out.getvalue() == ""  # nothing to say before the minute is up
    progress.update(counts(by_status={"done": 3, "queued": 7}, paused=True))
    progress.update(counts(by_status={"done": 3, "queued": 7}, paused=True))  # said once
    progress.update(counts(by_status={"done": 4, "queued": 6}))  # resumed
    progress.update(counts(by_status={"done": 4, "running": 2, "cancelled": 4}, cancelled=True))
    assert out.getvalue().splitlines() == [
        "progress: 3/10 finished (0 failed), paused (no new job starts until `pixelmill resume`)",
        "progress: 4/10 finished (0 failed)",
        "progress: 8/10 finished (0 failed, 4 cancelled), cancelled (its running jobs finish)",
    ]


# ---- priorities on the broker -----------------------------------------------------------


def test_each_priority_has_its_own_list_and_queue_lengths_sums_them_all(tmp_path, redis_server):
    queue = "q-" + uuid.uuid4().hex[:8]
    settings = load_settings(broker_url=redis_server.url, queue=queue,
                             data_dir=str(tmp_path / "data"))  # fmt: skip
    app = create_app(settings)
    raw = redis_server.client()
    try:
        assert enqueue(app, [f"h{i}" for i in range(3)], 1, "high") == 3
        assert enqueue(app, [f"n{i}" for i in range(4)], 2, "normal") == 2
        assert enqueue(app, [f"l{i}" for i in range(10)], 2, "low") == 5
        # kombu's Redis transport: the queue's own name for step 0, "<queue>\x06\x16<step>"
        # for the others; each message on the list of its priority's step.
        lists = {name: raw.llen(name) for name in (
            queue, f"{queue}\x06\x163", f"{queue}\x06\x166", f"{queue}\x06\x169")}  # fmt: skip
        assert lists == {queue: 3, f"{queue}\x06\x163": 2, f"{queue}\x06\x166": 5,
                         f"{queue}\x06\x169": 0}  # fmt: skip
        assert queue_lengths(app, queue) == {"high": 3, "normal": 2, "low": 5, "other": 0}
        assert queue_length(app, queue) == 10  # what the reconciler asks: every list
        body = json.loads(raw.lindex(f"{queue}\x06\x166", 0))
        assert body["properties"]["priority"] == PRIORITIES["low"]
    finally:
        raw.delete(queue, *(f"{queue}\x06\x16{step}" for step in (3, 6, 9)))
        app.close()


# ---- against real processes ---------------------------------------------------------------


def _env(tmp_path: Path, redis_url: str, **extra: str) -> dict[str, str]:
    return pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_url,
                         database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                         queue="q-" + uuid.uuid4().hex[:8], **extra)  # fmt: skip


def _client(env: dict[str, str]) -> Client:
    settings = load_settings(**{k[len("PIXELMILL_"):].lower(): v for k, v in env.items()
                                if k.startswith("PIXELMILL_")})  # fmt: skip
    return Client(settings)


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:05d}.png"
        Image.new("RGB", (8, 8), (i % 256, 40, 90)).save(path)
        paths.append(str(path))
    return paths


def _db(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "jobs.db", timeout=30)


def _counts(tmp_path: Path, batch: str) -> dict[str, int]:
    with _db(tmp_path) as db:
        rows = db.execute("SELECT status, count(*) FROM jobs WHERE batch_id=? GROUP BY status",
                          (batch,)).fetchall()  # fmt: skip
    return dict(rows)


def _until(check: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def _until_held(tmp_path: Path, batch: str, gate: NullGate) -> None:
    """Wait until the gate's items are all taken, a job finished and one is held running.

    Not "until 10 are done": a worker writes a message's jobs together, and the 10 items the
    gate lets through may fall into more than 5 messages (each worker has
    PIXELMILL_PIPELINE_DEPTH messages in flight, and each item takes a ticket as its thread
    gets there), so a message may hold an item that passed and one that waits. Loaded run 8
    saw that: it stayed below 10 done for 120 s."""
    _until(gate.waiting, "the gate's items were never all taken")
    last: list[dict[str, int]] = [{}]

    def held() -> bool:
        last[0] = counts = _counts(tmp_path, batch)  # this read only: a status may empty
        return bool(counts.get("done") and counts.get("running"))

    try:
        _until(held, "no job finished, or none is held running")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last[0]}") from None


def _only_batch(tmp_path: Path) -> str | None:
    if not (tmp_path / "jobs.db").exists():
        return None
    with _db(tmp_path) as db:
        try:
            row = db.execute("SELECT id FROM batches").fetchone()
        except sqlite3.OperationalError:  # not migrated yet
            return None
    return row[0] if row else None


def _unacked(server: Any, queue: str) -> list[Any]:
    """The messages of ``queue`` that a worker holds unacknowledged (kombu's Redis transport
    keeps them in the "unacked" hash as [message, exchange, routing key])."""
    held = (json.loads(v) for v in server.client().hvals("unacked"))
    return [m for m in held if m[2] == queue]


def _ts(value: str | None) -> datetime | None:
    """A timestamp as SQLite holds it (UTC, no zone)."""
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


@pytest.fixture
def run_proc(spawn: Any) -> Callable[..., subprocess.Popen[str]]:
    """Start `pixelmill run` processes; any still running at the end is stopped."""

    def start(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
        return spawn("run", *args, env=env, stdout=subprocess.PIPE,  # type: ignore[no-any-return]
                     stderr=subprocess.PIPE, text=True)  # fmt: skip

    return start


@pytest.mark.slow
def test_pause_holds_a_running_batch_and_resume_finishes_it_each_job_once(
    tmp_path, redis_server, run_proc, null_gate
):
    # The null model finishes an item only when the gate lets it: 10 go through, then the
    # batch is held running (its next jobs claimed, waiting) until the pause has landed.
    env = {**_env(tmp_path, redis_server.url), **null_gate.env}
    folder = tmp_path / "in"
    n = 400
    _images(folder, n)
    null_gate.allow(10)
    proc = run_proc("classify", str(folder), "--model", "null", "--devices", "cpu",
                    "--batch-size", "2", "--priority", "low", "--json", env=env)  # fmt: skip
    batch = _until(lambda: _only_batch(tmp_path), "the batch was never registered")
    _until_held(tmp_path, batch, null_gate)
    paused = pixelmill("pause", batch, env=env, timeout=60)
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.startswith(f"batch {batch}: paused:"), paused.stdout
    assert " running finish" in paused.stdout and " 0 running" not in paused.stdout
    null_gate.open()
    with _db(tmp_path) as db:
        (paused_at,) = db.execute("SELECT paused_at FROM batches WHERE id=?", (batch,)).fetchone()
    # The running jobs finish; then nothing moves however long we look.
    _until(lambda: not _counts(tmp_path, batch).get("running"), "running jobs never finished")
    held = _counts(tmp_path, batch)
    time.sleep(3)
    assert _counts(tmp_path, batch) == held
    assert held.get("queued", 0) > n // 4, held  # the pause came early enough to mean something
    with _db(tmp_path) as db:
        (last_start,) = db.execute("SELECT max(started_at) FROM jobs WHERE batch_id=?",
                                   (batch,)).fetchone()  # fmt: skip
    # No job started after the pause (a claim in flight as it committed may start a few ms
    # before its own commit: allow that, not a second's worth of messages).
    assert _ts(last_start) <= _ts(paused_at) + timedelta(seconds=0.5), (last_start, paused_at)
    # The batch's messages were taken and acknowledged with nothing claimed: none waits on
    # the broker, none is held unacknowledged.
    with _client(env) as client:
        _until(lambda: queue_length(client.app, client.settings.queue) == 0,
               "the paused batch's messages stayed on the queue")  # fmt: skip
    _until(lambda: not _unacked(redis_server, env["PIXELMILL_QUEUE"]),
           "messages left unacknowledged")  # fmt: skip
    status = pixelmill("status", batch, "--json", env=env, timeout=60)
    data = json.loads(status.stdout)
    assert (data["state"], data["queued"], data["running"]) == ("paused", held["queued"], 0)
    assert data["priority"] == "low"  # run --priority
    text_status = pixelmill("status", batch, env=env, timeout=60).stdout
    assert "state   paused" in text_status, text_status
    assert proc.poll() is None  # `run` keeps waiting
    resumed = pixelmill("resume", batch, "--json", env=env, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed"] == held["queued"]
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "paused" in err  # its progress line said so, at once
    jobs = [json.loads(line) for line in out.splitlines()]
    assert len(jobs) == n and {j["status"] for j in jobs} == {"done"}
    with _db(tmp_path) as db:
        attempts = db.execute("SELECT DISTINCT attempts FROM jobs WHERE batch_id=?",
                              (batch,)).fetchall()  # fmt: skip
        results = db.execute("SELECT count(*), count(DISTINCT r.job_id) FROM results r "
                             "JOIN jobs j ON j.id=r.job_id WHERE j.batch_id=?",
                             (batch,)).fetchone()  # fmt: skip
    assert attempts == [(1,)]  # every job started exactly once
    assert results == (n, n)  # one result each: nothing lost, nothing doubled


@pytest.mark.slow
@MANY_PROCESSES
def test_cancel_ends_queued_jobs_cancelled_counted_apart_everywhere(
    tmp_path, redis_server, run_proc, null_gate
):
    # The null model finishes an item only when the gate lets it: 10 go through, then the
    # batch is held running until the cancel has landed.
    env = {**_env(tmp_path, redis_server.url), **null_gate.env}
    folder = tmp_path / "in"
    n = 400
    _images(folder, n)
    null_gate.allow(10)
    proc = run_proc("classify", str(folder), "--model", "null", "--devices", "cpu",
                    "--batch-size", "2", "--json", env=env)  # fmt: skip
    batch = _until(lambda: _only_batch(tmp_path), "the batch was never registered")
    _until_held(tmp_path, batch, null_gate)
    cancelled = pixelmill("cancel", batch, env=env, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"batch {batch}: cancelled: "), cancelled.stdout
    null_gate.open()
    # `run` stops waiting once the running jobs finished, and says how it ended: exit 5.
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    assert f"batch {batch} was cancelled" in err
    jobs = [json.loads(line) for line in out.splitlines()]
    by_status = {s: sum(j["status"] == s for j in jobs) for s in ("done", "cancelled")}
    assert len(jobs) == n and by_status["done"] + by_status["cancelled"] == n, by_status
    assert by_status["done"] >= 10 and by_status["cancelled"] > n // 2, by_status
    assert all(j["result"] == {} for j in jobs if j["status"] == "done")  # kept
    assert all(j["result"] is None and j["error"] == "cancelled by a user"
               for j in jobs if j["status"] == "cancelled")  # fmt: skip
    # status: the state, and cancelled counted on its own, not as failed.
    data = json.loads(pixelmill("status", batch, "--json", env=env, timeout=60).stdout)
    assert (data["state"], data["cancelled"], data["failed"], data["done"]) == (
        "cancelled", by_status["cancelled"], 0, by_status["done"])  # fmt: skip
    table = pixelmill("status", env=env, timeout=60).stdout.splitlines()
    assert "STATE" in table[0] and "CANCELLED" in table[0] and " cancelled " in table[1]
    # results: a cancelled job shows as cancelled; exit 5.
    results = pixelmill("results", batch, env=env, timeout=60)
    assert results.returncode == 5
    lines = results.stdout.splitlines()
    assert sum(line.startswith("cancelled ") for line in lines) == by_status["cancelled"]
    # export: the status column says cancelled.
    exported = pixelmill("export", batch, "--format", "csv", "-o", "-", env=env, timeout=60)
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert sum(r["status"] == "cancelled" for r in rows) == by_status["cancelled"]
    assert f"{by_status['cancelled']} cancelled" in exported.stderr
    # Terminal: retry leaves it, pause/resume/priority refuse it (exit 2, naming it); cancel
    # again changes nothing.
    for args in (("retry", batch), ("pause", batch), ("resume", batch),
                 ("priority", batch, "high")):  # fmt: skip
        refused = pixelmill(*args, env=env, timeout=60)
        assert refused.returncode == 2, (args, refused.stderr)
        assert f"batch {batch} was cancelled" in refused.stderr
    again = pixelmill("cancel", batch, "--json", env=env, timeout=60)
    assert again.returncode == 0 and json.loads(again.stdout)["cancelled_now"] == 0
    assert _counts(tmp_path, batch) == {k: v for k, v in by_status.items() if v}
    # The same inputs again: a new batch (the cancelled one is not "this submit, done").
    resubmit = pixelmill("submit", "classify", str(folder), "--model", "null", "--batch-size",
                         "2", "--json", env=env, timeout=120)  # fmt: skip
    assert resubmit.returncode == 0, resubmit.stderr
    sub = json.loads(resubmit.stdout)
    assert sub["batch"] != batch and not sub["existing"] and not sub["attached"]


def test_priority_pause_and_resume_from_the_command_line(tmp_path, redis_server):
    """No worker: what each command says, stores and puts on which Redis list (a window of 4
    messages: all 3 of the batch's)."""
    env = _env(tmp_path, redis_server.url, window="4")
    queue = env["PIXELMILL_QUEUE"]
    lists = {"high": queue, "normal": f"{queue}\x06\x163", "low": f"{queue}\x06\x166"}
    raw = redis_server.client()
    inputs = _images(tmp_path / "in", 6)
    sub = pixelmill("submit", "classify", *inputs, "--model", "null", "--batch-size", "2",
                    "--priority", "low", "--json", env=env, timeout=120)  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    batch = json.loads(sub.stdout)["batch"]
    assert {k: raw.llen(v) for k, v in lists.items()} == {"high": 0, "normal": 0, "low": 3}
    data = json.loads(pixelmill("status", batch, "--json", env=env, timeout=60).stdout)
    assert (data["state"], data["priority"], data["queued"]) == ("queued", "low", 6)
    up = pixelmill("priority", batch, "high", env=env, timeout=60)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"batch {batch}: priority low -> high: 6 queued job(s) " \
        "enqueued again at it"  # fmt: skip
    # The old messages stay where they were (they will find their jobs taken).
    assert {k: raw.llen(v) for k, v in lists.items()} == {"high": 3, "normal": 0, "low": 3}
    same = pixelmill("priority", batch, "high", "--json", env=env, timeout=60)
    assert json.loads(same.stdout)["requeued"] == 0
    paused = pixelmill("pause", batch, env=env, timeout=60)
    assert paused.stdout.strip() == (f"batch {batch}: paused: 6 queued job(s) wait, 0 running "
                                     f"finish (`pixelmill resume {batch}` carries on)")  # fmt: skip
    again = pixelmill("pause", batch, "--json", env=env, timeout=60)
    assert json.loads(again.stdout)["changed"] is False
    shown = pixelmill("status", batch, env=env, timeout=60).stdout
    assert "state   paused (no new job starts until `pixelmill resume`)   priority high" in shown
    listed = pixelmill("status", env=env, timeout=60).stdout.splitlines()
    assert listed[0].split()[4:6] == ["STATE", "PRIORITY"]
    assert listed[1].split()[5:7] == ["paused", "high"], listed
    resumed = pixelmill("resume", batch, env=env, timeout=60)
    assert resumed.stdout.strip() == f"batch {batch}: resumed: 6 queued job(s) enqueued again"
    assert raw.llen(lists["high"]) == 6
    idle = pixelmill("resume", batch, env=env, timeout=60)
    assert idle.returncode == 0 and "not paused: nothing to resume" in idle.stdout


def test_control_of_an_unknown_batch_is_a_usage_error_naming_it(tmp_path, redis_server):
    env = _env(tmp_path, redis_server.url)
    with _client(env):  # creates the database
        pass
    for args in (("pause", "nope-123"), ("resume", "nope-123"), ("cancel", "nope-123"),
                 ("priority", "nope-123", "low")):  # fmt: skip
        proc = pixelmill(*args, env=env, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip() == "pixelmill: no batch with id 'nope-123' in this database"
    bad = pixelmill("priority", "nope-123", "urgent", env=env, timeout=60)
    assert bad.returncode == 2 and "urgent" in bad.stderr
    bad = pixelmill("submit", "classify", "x.jpg", "--priority", "urgent", env=env, timeout=60)
    assert bad.returncode == 2 and "urgent" in bad.stderr


@pytest.mark.slow
def test_a_high_priority_batch_overtakes_a_large_low_priority_queue(tmp_path, redis_server):
    env = _env(tmp_path, redis_server.url)
    size = 32  # jobs per message
    low_inputs = _images(tmp_path / "low", 16)
    with _client(env) as client:
        with client.sessions.begin() as s:
            low = create_batch(s, task="classify", model="null", message_size=size,
                               inputs=[low_inputs[i % 16] for i in range(40_000)],
                               priority="low")  # fmt: skip
        enqueue(client.app, low.job_ids, size, "low")
        assert queue_lengths(client.app, client.settings.queue)["low"] == 40_000 // size
    # One device worker (threads pool of PIPELINE_DEPTH 2, prefetch 1: it holds two messages).
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "pixelmill", "worker", "--devices", "cpu",
                               "--cpu-workers", "1"], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _overtake(tmp_path, env, low.batch_id, size)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


def _overtake(tmp_path: Path, env: dict[str, str], low_batch: str, size: int) -> None:
    _until(lambda: _counts(tmp_path, low_batch).get("done", 0) >= 10 * size,
           "the low batch never got going", timeout=180)  # fmt: skip
    high_inputs = _images(tmp_path / "high", 2 * size)
    with _client(env) as client:
        high = client.submit("classify", high_inputs, model="null", batch_size=size,
                             priority="high").batch_id  # fmt: skip
        enqueued = datetime.now(UTC)  # its messages are on the broker
    _until(lambda: _counts(tmp_path, high).get("done") == 2 * size,
           "the high batch never finished")  # fmt: skip
    since = enqueued.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    with _db(tmp_path) as db:
        (first,) = db.execute("SELECT min(started_at) FROM jobs WHERE batch_id=?",
                              (high,)).fetchone()  # fmt: skip
        overtaken = db.execute(
            "SELECT count(*) FROM jobs WHERE batch_id=? AND started_at > ? AND started_at < ?",
            (low_batch, since, first),
        ).fetchone()[0]
        low_left = db.execute("SELECT count(*) FROM jobs WHERE batch_id=? AND status='queued'",
                              (low_batch,)).fetchone()[0]  # fmt: skip
    # The worker finishes the messages it holds, then takes the high batch's before any
    # other low one: at most a message or two of low work started in between.
    assert overtaken <= 2 * size, overtaken
    assert _ts(first) - enqueued < timedelta(seconds=5)
    assert low_left > 30_000  # the low batch was far from done
