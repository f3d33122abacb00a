"""The schema and the state functions, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest
from sqlalchemy import func, inspect, select, update

from pixelmill.db.engine import make_engine, make_sessionmaker, newest_revision, open_database
from pixelmill.db.jobs import claim_jobs, create_batch, write_outcomes
from pixelmill.db.migrate import current_revision, head_revision, upgrade
from pixelmill.db.reads import batch_counts, batch_failures, iter_batch_jobs
from pixelmill.db.records import Outcome, failure_kind
from pixelmill.db.schema import Job, JobStatus, Result, utcnow
from pixelmill.errors import UnknownBatch


def test_migrations_create_the_schema_and_are_idempotent(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert {"batches", "jobs", "results", "artifacts"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_the_fast_check_at_open_knows_the_head_and_an_old_schema_is_still_migrated(database_url):
    """Opening a database reads its version with one SELECT (no Alembic) and migrates only
    when it is behind: the newest migration file names Alembic's head, and a database left
    at an older revision is brought to it."""
    from pixelmill.db.migrate import migrate

    assert newest_revision() == head_revision()
    engine = make_engine(database_url)
    upgrade(engine)
    migrate(engine, "0008", down=True)
    assert current_revision(engine) == "0008"
    engine.dispose()
    with open_database(database_url) as database:
        assert current_revision(database.engine) == head_revision()


def test_migrations_match_the_models(database_url):
    """What Alembic builds is exactly what the SQLAlchemy models declare (no drift)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from pixelmill.db.schema import Base

    engine = make_engine(database_url)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def _batch(sessions, n=3):
    with sessions.begin() as s:
        return create_batch(
            s, task="classify", model="m", inputs=[f"/in/{i}.jpg" for i in range(n)]
        )


def test_claim_moves_queued_jobs_to_running_and_counts_attempts(sessions):
    new = _batch(sessions)
    with sessions.begin() as s:
        claimed = claim_jobs(s, new.job_ids, worker="w1", device="cpu")
    assert [c.job_id for c in claimed] == new.job_ids
    assert all(c.attempts == 1 and c.task == "classify" for c in claimed)
    with sessions() as s:
        assert batch_counts(s, new.batch_id).by_status == {"running": 3}


def test_redelivered_batch_changes_nothing_once_done(sessions):
    new = _batch(sessions, 2)
    ok = Outcome(job_id=new.job_ids[0], result={"labels": []}, model="m", device="cpu")
    bad = Outcome(job_id=new.job_ids[1], error="/in/1.jpg: broken", model="m", device="cpu")
    with sessions.begin() as s:
        claim_jobs(s, new.job_ids, worker="w", device="cpu")
        write_outcomes(s, [ok, bad])
    # The same message again: nothing is claimed, and a second write neither duplicates the
    # result nor moves a finished job.
    with sessions.begin() as s:
        assert claim_jobs(s, new.job_ids, worker="w2", device="cpu") == []
        write_outcomes(s, [Outcome(job_id=new.job_ids[1], result={"x": 1}, model="m")])
        write_outcomes(s, [ok])
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 1
        rows = list(iter_batch_jobs(s, new.batch_id))
        assert [r.status for r in rows] == [JobStatus.done, JobStatus.failed]
        assert rows[1].error == "/in/1.jpg: broken" and rows[1].result is None
        found = batch_failures(s, new.batch_id)
        assert [(g.kind, g.jobs) for g in found.groups] == [("broken", 1)]
        assert [e.input for e in found.groups[0].examples] == ["/in/1.jpg"]


def test_failures_group_by_kind_not_by_file_and_say_what_is_not_shown(sessions):
    """Ten truncated files, each with its own detail, are one kind; the examples are the first
    inputs in submission order, with their details; the kinds and jobs past the limit are
    counted. The database groups by the same rule as ``failure_kind``."""
    names = [f"/in/trunc {i} 100% é.jpg" for i in range(10)] + ["/in/a.txt", "/in/b.txt"]
    names += ["/in/c.jpg", "/in/d.jpg", "/in/e.jpg"]
    errors = [
        f"{n}: corrupt or truncated image (image file is truncated ({i} bytes not processed))"
        for i, n in enumerate(names[:10])
    ]
    errors += [f"{n}: not an image file (format not recognised)" for n in names[10:12]]
    errors += [
        "unexpected error: RuntimeError: boom (a bug)",  # no input in front: the whole error
        "gave up after 3 attempts: the worker stopped (crashed or was killed) each time",
        "/in/e.jpg: cannot read the file (Permission denied)",
    ]
    with sessions.begin() as s:
        new = create_batch(s, task="classify", model="m", inputs=names)
        claim_jobs(s, new.job_ids, worker="w", device="cpu")
        write_outcomes(
            s,
            [
                Outcome(job_id=j, error=e, model="m", device="cpu")
                for j, e in zip(new.job_ids, errors, strict=True)
            ],
        )
    with sessions() as s:
        found = batch_failures(s, new.batch_id, examples=3, limit=2)
        everything = batch_failures(s, new.batch_id, examples=20, limit=20)
    assert (found.jobs, found.kinds, found.more_kinds, found.more_jobs) == (15, 5, 3, 3)
    truncated, not_image = found.groups
    assert (truncated.kind, truncated.jobs) == ("corrupt or truncated image", 10)
    assert [e.input for e in truncated.examples] == names[:3]
    assert truncated.examples[1].detail == "(image file is truncated (1 bytes not processed))"
    assert (not_image.kind, not_image.jobs) == ("not an image file", 2)
    kinds = {g.kind: g.jobs for g in everything.groups}
    assert kinds == {
        "corrupt or truncated image": 10,
        "not an image file": 2,
        "unexpected error: RuntimeError: boom": 1,
        "gave up after 3 attempts: the worker stopped (crashed or was killed) each time": 1,
        "cannot read the file": 1,
    }
    for group in everything.groups:  # SQL and Python agree
        for example in group.examples:
            assert failure_kind(example.error, example.input)[0] == group.kind


def test_results_upsert_keeps_one_row_per_job(sessions):
    new = _batch(sessions, 1)
    job = new.job_ids[0]
    with sessions.begin() as s:
        claim_jobs(s, [job], worker="w", device="cpu")
        # Two workers racing on a redelivered message both write: one row survives.
        write_outcomes(s, [Outcome(job_id=job, result={"v": 1}, model="m")])
    with sessions.begin() as s:
        s.execute(Job.__table__.update().values(status=JobStatus.running))
        write_outcomes(s, [Outcome(job_id=job, result={"v": 2}, model="m")])
    with sessions() as s:
        assert s.scalars(select(Result.data)).all() == [{"v": 2}]


def test_batch_listing_pages_in_submission_order(sessions):
    new = _batch(sessions, 7)
    with sessions() as s:
        rows = list(iter_batch_jobs(s, new.batch_id, page=3))
    assert [r.job_id for r in rows] == new.job_ids
    assert [r.input for r in rows] == [f"/in/{i}.jpg" for i in range(7)]


def test_unknown_batch_is_a_clear_error(sessions):
    with sessions() as s, pytest.raises(UnknownBatch, match="nope"):
        batch_counts(s, "nope")


def test_artifact_rows_are_upserted_by_key_and_listed_with_their_job(sessions):
    from pixelmill.db.records import ArtifactRecord
    from pixelmill.db.schema import Artifact

    with sessions.begin() as s:
        new = create_batch(
            s,
            task="generate",
            model="m",
            inputs=["a cat", "a dog"],
            params=[{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "seed": 2}],
        )
    artifact = ArtifactRecord(
        key=f"batches/{new.batch_id}/{new.job_ids[0]}-0.png",
        uri="file:///store/x.png",
        content_type="image/png",
        size=10,
        sha256="0" * 64,
        width=64,
        height=32,
        seed=2**40,
        steps=2,
        precision="fp32",
    )
    outcome = Outcome(
        job_id=new.job_ids[0], result={"seed": 1}, model="m", device="cpu", artifacts=(artifact,)
    )
    with sessions.begin() as s:
        claimed = claim_jobs(s, new.job_ids, worker="w", device="cpu")
        assert [c.params["prompt"] for c in claimed] == ["a cat", "a dog"]
        assert claimed[0].batch_id == new.batch_id
        write_outcomes(s, [outcome])
    with sessions.begin() as s:  # a duplicate delivery racing in: the same key, one row
        s.execute(Job.__table__.update().values(status=JobStatus.running))
        write_outcomes(s, [outcome])
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Artifact)) == 1
        row = s.get(Artifact, artifact.key)
        assert (row.job_id, row.model, row.device, row.seed) == (new.job_ids[0], "m", "cpu", 2**40)
        rows = list(iter_batch_jobs(s, new.batch_id))
    assert rows[0].artifact == artifact
    assert rows[1].artifact is None


def test_leases_expire_only_for_jobs_nobody_holds_and_are_taken_once(sessions):
    from pixelmill.db.jobs import renew_leases, take_stranded
    from pixelmill.wire import message_size

    with sessions.begin() as s:
        new = create_batch(s, task="classify", model="m", inputs=[f"/in/{i}.jpg" for i in range(4)],
                           message_size=2, queued_lease=0)  # fmt: skip
    with sessions.begin() as s:
        claim_jobs(s, new.job_ids[:2], worker="dead/1", device="cpu", lease=0)
        claim_jobs(s, new.job_ids[2:3], worker="alive/2", device="cpu", lease=0)
        assert renew_leases(s, new.job_ids, worker="alive/2", lease=60) == 1
    with sessions.begin() as s:
        (running,) = take_stranded(s, status=JobStatus.running, lease=60)
        (queued,) = take_stranded(s, status=JobStatus.queued, lease=60)
        # Taken once: a second reconciler right after finds nothing.
        assert take_stranded(s, status=JobStatus.running, lease=60) == []
    assert (running.job_ids, message_size(running.message_size)) == (new.job_ids[:2], 2)
    assert queued.job_ids == new.job_ids[3:]


def test_after_a_broker_loss_every_queued_job_is_taken_once_whatever_its_lease(sessions):
    """The reconciler's recovery when Redis lost its messages: the queued jobs whose lease ends
    before the one it gives are taken (all of them, leases far from over), each once; running
    jobs and the jobs of paused batches are not."""
    from datetime import timedelta

    from pixelmill.db.control import pause_batch
    from pixelmill.db.jobs import take_stranded
    from pixelmill.db.schema import utcnow

    with sessions.begin() as s:
        new = create_batch(s, task="classify", model="m", inputs=[f"/in/{i}.jpg" for i in range(5)],
                           queued_lease=3600)  # fmt: skip
        held = create_batch(s, task="classify", model="m", inputs=["/in/x.jpg"], queued_lease=3600)
        pause_batch(s, held.batch_id)
    with sessions.begin() as s:
        claim_jobs(s, new.job_ids[:1], worker="alive/1", device="cpu", lease=60)
    with sessions.begin() as s:
        assert take_stranded(s, status=JobStatus.queued, lease=3600) == []  # none overdue
        after = utcnow() + timedelta(seconds=3600)
        (queued,) = take_stranded(s, status=JobStatus.queued, lease=3600, expired_before=after)
        assert take_stranded(s, status=JobStatus.queued, lease=3600, expired_before=after) == []
    assert queued.job_ids == new.job_ids[1:]


def test_pages_of_a_batch_are_its_jobs_in_order_at_any_offset_with_or_without_a_status(
    sessions,
):
    from pixelmill.db.reads import batch_jobs_page

    with sessions.begin() as s:
        new = create_batch(s, task="classify", model="m", inputs=[f"/in/{i}.jpg" for i in range(7)])
        other = create_batch(s, task="classify", model="m", inputs=["/in/x.jpg"] * 3)
        claim_jobs(s, new.job_ids[1::2], worker="w/1", device="cpu")  # 1, 3, 5 running
    with sessions() as s:

        def page(offset: int, limit: int, status: str | None = None) -> list[str]:
            jobs = batch_jobs_page(s, new.batch_id, offset=offset, limit=limit, status=status)
            return [j.input for j in jobs]

        assert page(0, 3) == ["/in/0.jpg", "/in/1.jpg", "/in/2.jpg"]
        assert page(5, 3) == ["/in/5.jpg", "/in/6.jpg"]  # the other batch's jobs never show
        assert page(7, 3) == [] and page(100, 3) == []
        assert page(1, 2, "running") == ["/in/3.jpg", "/in/5.jpg"]
        assert page(0, 9, "queued") == ["/in/0.jpg", "/in/2.jpg", "/in/4.jpg", "/in/6.jpg"]
        assert len(batch_jobs_page(s, other.batch_id, offset=2, limit=5)) == 1


def test_pages_by_cursor_walk_a_state_forward_and_back_across_its_leased_and_other_jobs(
    sessions,
):
    """after/before (a job's seq) page through the jobs of one state by key: queued jobs with
    a message (a lease) and without (the backlog) come in one seq order, as do all jobs."""
    from pixelmill.db.reads import batch_jobs_page

    with sessions.begin() as s:
        new = create_batch(s, task="classify", model="m", message_size=2, window=2,
                           inputs=[f"/in/{i}.jpg" for i in range(30)])  # fmt: skip
        claim_jobs(s, new.job_ids[:2], worker="w/1", device="cpu")  # 0, 1 running
        s.execute(update(Job).where(Job.batch_id == new.batch_id, Job.seq.in_([9, 17, 25]))
                  .values(lease_until=utcnow()))  # fmt: skip  # messages sent for a few
    with sessions() as s:

        def walk(status: str | None, limit: int) -> tuple[list[int], list[int]]:
            forward, pages = [], []
            page = batch_jobs_page(s, new.batch_id, limit=limit, status=status)
            while page:
                pages.append([j.seq for j in page])
                forward += pages[-1]
                page = batch_jobs_page(s, new.batch_id, limit=limit, status=status,
                                       after=page[-1].seq)  # fmt: skip
            back = pages[-1]
            while True:
                page = batch_jobs_page(s, new.batch_id, limit=limit, status=status,
                                       before=back[0] if back else 0)  # fmt: skip
                if not page:
                    break
                assert len(page) == limit  # a full page back, the one shown before
                back = [j.seq for j in page] + back
            return forward, back

        queued = [i for i in range(30) if i >= 2]
        assert walk("queued", 4) == (queued, queued)
        assert walk(None, 7) == (list(range(30)), list(range(30)))
        assert walk("running", 1) == ([0, 1], [0, 1])
        assert batch_jobs_page(s, new.batch_id, status="queued", after=8, limit=3)[0].seq == 9


def test_a_job_whose_worker_keeps_dying_fails_after_max_attempts(sessions):
    new = _batch(sessions, 2)
    for attempt in range(3):
        with sessions.begin() as s:
            # lease=0: the holder dies at once (its lease runs out), so the next claim may
            # take the job again
            claimed = claim_jobs(s, new.job_ids, worker=f"w/{attempt}", device="cpu",
                                 max_attempts=3, lease=0)  # fmt: skip
        assert [c.attempts for c in claimed] == [attempt + 1] * 2
        with sessions.begin() as s:  # the second job finishes; the first one's worker dies
            write_outcomes(s, [Outcome(job_id=new.job_ids[1], result={"x": 1}, model="m")])
            s.execute(Job.__table__.update().where(Job.id == new.job_ids[1])
                      .values(status=JobStatus.running))  # fmt: skip
    with sessions.begin() as s:
        assert claim_jobs(s, new.job_ids[:1], worker="w/4", device="cpu", max_attempts=3) == []
    with sessions() as s:
        (first, _second) = list(iter_batch_jobs(s, new.batch_id))
    assert first.status == JobStatus.failed and first.attempts == 3
    assert "gave up after 3 attempts" in (first.error or "")


def test_retry_puts_only_failed_jobs_back_with_fresh_attempts(sessions):
    from pixelmill.db.jobs import requeue_failed

    new = _batch(sessions, 3)
    with sessions.begin() as s:
        claim_jobs(s, new.job_ids, worker="w", device="cpu")
        write_outcomes(s, [
            Outcome(job_id=new.job_ids[0], result={"x": 1}, model="m"),
            Outcome(job_id=new.job_ids[1], error="/in/1.jpg: broken", model="m"),
            Outcome(job_id=new.job_ids[2], error="/in/2.jpg: broken", model="m"),
        ])  # fmt: skip
    with sessions.begin() as s:
        assert requeue_failed(s, new.batch_id) == new.job_ids[1:]
    with sessions() as s:
        rows = list(iter_batch_jobs(s, new.batch_id))
        assert [r.status for r in rows] == [JobStatus.done, JobStatus.queued, JobStatus.queued]
        assert rows[1].attempts == 0 and rows[1].error is None
        with pytest.raises(UnknownBatch):
            requeue_failed(s, "nope")


def test_the_per_message_statements_find_jobs_by_primary_key_however_many_are_open(tmp_path):
    """A worker claims and finishes each message's jobs by id. On SQLite, `status IN (queued,
    running)` beside `id IN (...)` once made the planner walk the status index over every
    open job of the batch, per message: quadratic in the batch's size (a 16,384-job batch ran
    at 2,850 jobs/s instead of 4,100+). Every statement of that path must look jobs up by
    their primary key."""
    from sqlalchemy import event

    engine = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        new = create_batch(s, task="classify", model="m", inputs=[f"{i}.jpg" for i in range(500)])
    ids = list(new.job_ids)
    with sessions.begin() as s:  # a job finished already: the claim's second statement runs
        claim_jobs(s, ids[:1], worker="w", device="cpu")
        write_outcomes(s, [Outcome(job_id=ids[0], result={"label": "x"})])
    seen: list[tuple[str, object]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        if " jobs" in statement and not statement.lstrip().upper().startswith("INSERT"):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    with sessions.begin() as s:
        claimed = claim_jobs(s, ids[:32], worker="w", device="cpu", lease=60, max_attempts=3)
    assert len(claimed) == 31
    with sessions.begin() as s:
        write_outcomes(s, [Outcome(job_id=j, result={"label": "x"}) for j in ids[1:31]]
                       + [Outcome(job_id=ids[31], error="bad input")])  # fmt: skip
    event.remove(engine, "before_cursor_execute", capture)
    assert len(seen) >= 4  # 2 claim updates, a failed and a done update
    with engine.connect() as conn:
        for statement, parameters in seen:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            on_jobs = [row[-1] for row in plan if " jobs " in f"{row[-1]} "]
            assert on_jobs, (statement, plan)
            assert all("sqlite_autoindex_jobs_1" in d or "PRIMARY KEY" in d for d in on_jobs), (
                statement,
                plan,
            )
    engine.dispose()


def test_recent_batches_newest_first_with_their_counts(sessions):
    from pixelmill.db.reads import recent_batches

    first, second, third = (_batch(sessions, n) for n in (1, 2, 3))
    with sessions.begin() as s:
        claim_jobs(s, second.job_ids, worker="w", device="cpu")
        write_outcomes(s, [Outcome(job_id=second.job_ids[0], result={}),
                           Outcome(job_id=second.job_ids[1], error="bad")])  # fmt: skip
    with sessions() as s:
        listed = recent_batches(s, limit=2)
    assert [b.batch_id for b in listed] == [third.batch_id, second.batch_id]
    assert [b.by_status for b in listed] == [{"queued": 3}, {"done": 1, "failed": 1}]
    assert all(b.created_at is not None and b.created_at.tzinfo is not None for b in listed)
    assert first.batch_id not in {b.batch_id for b in listed}
