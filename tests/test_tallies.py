"""Job tallies: a batch's counts kept by the database's triggers equal a scan of its jobs,
through every change of state pixelmill makes (submit with reuse, claim, finish, fail, give up,
retry, the reconciler's take-back, cancel, a job deleted, an operator's own SQL), with workers
writing at once and the reconciler folding meanwhile (PostgreSQL), and after the migration
that creates them over work already there. On SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, text, update

from pixelmill.db.control import cancel_batch, pause_batch, resume_batch
from pixelmill.db.engine import make_engine, make_sessionmaker
from pixelmill.db.jobs import (
    claim_jobs,
    create_batch,
    fail_jobs,
    requeue_failed,
    take_stranded,
    write_outcomes,
)
from pixelmill.db.migrate import migrate
from pixelmill.db.reads import batch_counts, find_batches, recent_batches
from pixelmill.db.records import Outcome
from pixelmill.db.schema import Job, JobTally, utcnow
from pixelmill.db.tallies import fold, recount, tally


def _batch(sessions: Any, n: int, **kw: Any) -> Any:
    with sessions.begin() as s:
        return create_batch(s, task="classify", model="m", message_size=4,
                            inputs=[f"/in/{i}.jpg" for i in range(n)], **kw)  # fmt: skip


def _ids(sessions: Any, batch_id: str) -> list[str]:
    with sessions() as s:
        return list(s.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.seq)))


def _same(sessions: Any, batch_id: str) -> None:
    with sessions() as s:
        kept, scanned = tally(s, batch_id), recount(s, batch_id)
    assert kept == scanned


def _agree(kept: Any, scanned: Any, step: str) -> None:
    """The counts equal; the times are the earliest start and latest finish ever recorded,
    so a job sent back to queued (a retry) leaves them where they were."""
    assert (kept.by_status, kept.reused) == (scanned.by_status, scanned.reused), step
    if scanned.started_at is not None:
        assert kept.started_at is not None and kept.started_at <= scanned.started_at, step
    if scanned.last_finished_at is not None:
        assert kept.last_finished_at is not None, step
        assert kept.last_finished_at >= scanned.last_finished_at, step


def _claim(sessions: Any, ids: list[str], **kw: Any) -> list[str]:
    with sessions.begin() as s:
        return [c.job_id for c in claim_jobs(s, ids, worker="w/1", device="cpu", **kw)]


def _finish(sessions: Any, done: list[str], failed: list[str] = ()) -> None:  # type: ignore[assignment]
    outcomes = [Outcome(job_id=j, result={"label": "x"}, model="m") for j in done]
    outcomes += [Outcome(job_id=j, error=f"/in/{j}: broken", model="m") for j in failed]
    with sessions.begin() as s:
        write_outcomes(s, outcomes)


def test_tallies_follow_every_change_of_state(sessions):
    earlier = _batch(sessions, 3)
    reused = {i: earlier.job_ids[0] for i in (1, 5, 9)}
    new = _batch(sessions, 24, reused=reused)
    ids = _ids(sessions, new.batch_id)
    _same(sessions, new.batch_id)
    with sessions() as s:
        assert tally(s, new.batch_id).by_status == {"queued": 21, "done": 3}
        assert tally(s, new.batch_id).reused == 3
        assert tally(s, new.batch_id).last_finished_at is None  # reused: not the workers' work

    steps: list[tuple[str, Any]] = [
        ("claim", lambda: _claim(sessions, ids[:12])),
        ("finish", lambda: _finish(sessions, ids[:4], ids[4:6])),
        ("fail", lambda: _fail(sessions, ids[6:8])),
        ("claim again (finished, held)", lambda: _claim(sessions, ids[:10])),
        ("retry the failed", lambda: _retry(sessions, new.batch_id)),
        ("lease runs out, reconciler takes it back", lambda: _strand(sessions, ids[8:12])),
        ("claim, out of attempts", lambda: _claim(sessions, ids[8:12], max_attempts=1)),
        ("pause", lambda: _with(sessions, pause_batch, new.batch_id)),
        ("resume", lambda: _with(sessions, resume_batch, new.batch_id, queued_lease=60)),
        ("cancel", lambda: _with(sessions, cancel_batch, new.batch_id)),
        ("a job deleted", lambda: _sql(sessions, delete(Job).where(Job.id == ids[20]))),
        (
            "an operator's own UPDATE",
            lambda: _sql(
                sessions,
                update(Job).where(Job.id.in_(ids[21:23])).values(status="queued", finished_at=None),
            ),
        ),  # fmt: skip
    ]
    went_back = False
    for name, step in steps:
        step()
        went_back = went_back or name.startswith(("retry", "an operator"))
        with sessions() as s:
            kept, scanned = tally(s, new.batch_id), recount(s, new.batch_id)
        if went_back:
            _agree(kept, scanned, name)
        else:
            assert kept == scanned, name
    with sessions() as s:
        counts = batch_counts(s, new.batch_id)
        listed = {c.batch_id: c for c in recent_batches(s)}
        found = {c.batch_id: c for c in find_batches(s)}
    assert sum(counts.by_status.values()) == 23 and counts.reused == 3
    assert counts.started_at is not None and counts.last_finished_at is not None
    assert listed[new.batch_id].by_status == counts.by_status == found[new.batch_id].by_status
    assert found[new.batch_id].last_finished_at == counts.last_finished_at

    with sessions.begin() as s:  # folded: one row per state, the same figures
        before = tally(s, new.batch_id)
        fold(s, at_least=2)
    with sessions() as s:
        assert tally(s, new.batch_id) == before
        _agree(before, recount(s, new.batch_id), "folded")
        per_state = s.execute(
            select(JobTally.status, func.count()).where(JobTally.batch_id == new.batch_id)
            .group_by(JobTally.status)
        ).all()  # fmt: skip
    assert all(n == 1 for _, n in per_state)


def _fail(sessions: Any, ids: list[str]) -> None:
    with sessions.begin() as s:
        fail_jobs(s, ids, reason="worker lost")


def _retry(sessions: Any, batch_id: str) -> None:
    with sessions.begin() as s:
        requeue_failed(s, batch_id, queued_lease=60)


def _strand(sessions: Any, ids: list[str]) -> None:
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id.in_(ids)).values(
            lease_until=utcnow() - timedelta(seconds=5)))  # fmt: skip
    with sessions.begin() as s:
        take_stranded(s, status="running", lease=60)  # type: ignore[arg-type]


def _with(sessions: Any, change: Any, *args: Any, **kw: Any) -> None:
    with sessions.begin() as s:
        change(s, *args, **kw)


def _sql(sessions: Any, statement: Any) -> None:
    with sessions.begin() as s:
        s.execute(statement)


def test_tallies_hold_with_workers_writing_at_once_and_folding_meanwhile(sessions):
    """Four writers claim and finish a batch's jobs a message at a time while the reconciler's
    fold runs over and over: every job counted once, in its last state."""
    new = _batch(sessions, 400)
    ids = _ids(sessions, new.batch_id)
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(share: list[str]) -> None:
        try:
            for start in range(0, len(share), 4):
                claimed = _claim(sessions, share[start : start + 4])
                _finish(sessions, claimed[:3], claimed[3:])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def folding() -> None:
        try:
            while not stop.is_set():
                with sessions.begin() as s:
                    fold(s, at_least=2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(ids[i::4],)) for i in range(4)]
    folder = threading.Thread(target=folding)
    folder.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    folder.join()
    assert not errors, errors
    _same(sessions, new.batch_id)
    with sessions() as s:
        assert tally(s, new.batch_id).by_status == {"done": 300, "failed": 100}


def test_0011_counts_the_work_already_there(database_url):
    engine = make_engine(database_url)
    migrate(engine, "0010")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO batches (id, task, model, options, total, created_at) VALUES "
            "('b1', 'classify', 'm', '{}', 4, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        for seq, status, reused in ((0, "done", None), (1, "done", "j9"), (2, "queued", None),
                                    (3, "failed", None)):  # fmt: skip
            conn.execute(
                text("INSERT INTO jobs (id, batch_id, seq, input, status, attempts, created_at,"
                     " started_at, finished_at, reused_from) VALUES (:id, 'b1', :seq, 'x', "
                     ":status, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, "
                     ":reused)"),
                {"id": f"j{seq}", "seq": seq, "status": status, "reused": reused},
            )  # fmt: skip
    migrate(engine, "head")
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        kept = tally(s, "b1")
        assert kept == recount(s, "b1")
    assert kept.by_status == {"done": 2, "queued": 1, "failed": 1} and kept.reused == 1
    with sessions.begin() as s:  # and the triggers count what comes after
        s.execute(update(Job).where(Job.id == "j2").values(status="done"))
    with sessions() as s:
        assert tally(s, "b1").by_status == {"done": 3, "failed": 1}
    migrate(engine, "0010", down=True)
    with engine.begin() as conn:  # no trigger left writing to a table that is gone
        conn.execute(text("UPDATE jobs SET status = 'queued' WHERE id = 'j3'"))
    engine.dispose()


def test_a_big_submit_on_postgresql_leaves_the_planner_its_statistics(
    postgres_server, redis_server, tmp_path, monkeypatch
):
    """Right after a batch of ANALYZE_AT jobs or more, the submit analyzes the jobs table, so a
    first page of its results reads a page, not the batch (autovacuum gets to it minutes
    later). Smaller submits leave it to autovacuum."""
    from pixelmill.producer import Client, client
    from pixelmill.settings import load_settings

    database = postgres_server.create_database("t_analyze")
    settings = load_settings(data_dir=tmp_path / "data", database_url=database,
                             broker_url=redis_server.url)  # fmt: skip
    (tmp_path / "in").mkdir()
    paths = []
    for i in range(12):
        paths.append(str(tmp_path / "in" / f"{i}.jpg"))
        Path(paths[-1]).write_bytes(b"not an image, and not read: never processed here")

    def analyzed() -> Any:
        with c.engine.connect() as conn:
            return conn.execute(text("SELECT last_analyze FROM pg_stat_user_tables "
                                     "WHERE relname = 'jobs'")).scalar()  # fmt: skip

    with Client(settings) as c:
        monkeypatch.setattr(client, "ANALYZE_AT", 20)
        c.submit("classify", paths[:6], model="null")
        assert analyzed() is None
        monkeypatch.setattr(client, "ANALYZE_AT", 6)
        c.submit("classify", paths[6:], model="null")
        assert analyzed() is not None
