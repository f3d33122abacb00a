"""Migrations on a database that already holds work. 0007: rows survive, and the jobs.status
constraint accepts `cancelled` after the upgrade and only the old states after a downgrade.
0009: a batch's batch size moves from its options to its message size, and back."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from pixelmill.db.engine import make_engine
from pixelmill.db.migrate import migrate

JOB = (
    "INSERT INTO jobs (id, batch_id, seq, input, status, attempts, created_at) "
    "VALUES (:id, 'b1', :seq, '/in/x.jpg', :status, 0, CURRENT_TIMESTAMP)"
)


def test_0007_keeps_existing_work_and_allows_cancelled_both_ways(database_url):
    engine = make_engine(database_url)
    migrate(engine, "0006")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO batches (id, task, model, options, total, created_at) "
            "VALUES ('b1', 'classify', 'm', '{}', 2, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        conn.execute(text(JOB), [{"id": "j1", "seq": 0, "status": "done"},
                                 {"id": "j2", "seq": 1, "status": "queued"}])  # fmt: skip
        conn.execute(text(
            "INSERT INTO results (job_id, data, model, device, created_at) "
            "VALUES ('j1', '{}', 'm', 'cpu', CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        with pytest.raises(IntegrityError), conn.begin_nested():
            conn.execute(text(JOB), {"id": "j3", "seq": 2, "status": "cancelled"})
    migrate(engine, "head")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT priority, paused_at FROM batches")).all() == [
            ("normal", None)
        ]
        assert dict(conn.execute(text("SELECT id, status FROM jobs")).all()) == {
            "j1": "done", "j2": "queued"
        }  # fmt: skip
        # Copying jobs (SQLite) did not cascade into the results that reference it.
        assert conn.execute(text("SELECT job_id FROM results")).scalars().all() == ["j1"]
        conn.execute(text("UPDATE jobs SET status = 'cancelled' WHERE id = 'j2'"))
        with pytest.raises(IntegrityError), conn.begin_nested():
            conn.execute(text(JOB), {"id": "j3", "seq": 2, "status": "lost"})
    migrate(engine, "0006", down=True)
    with engine.begin() as conn:  # a cancelled job reads as failed to the older code
        assert dict(conn.execute(text("SELECT id, status FROM jobs")).all()) == {
            "j1": "done", "j2": "failed"
        }  # fmt: skip
        assert conn.execute(text("SELECT job_id FROM results")).scalars().all() == ["j1"]
        if engine.dialect.name == "sqlite":  # foreign keys are on again
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def _json(value):
    return json.loads(value) if isinstance(value, str) else value  # SQLite: text; PostgreSQL: dict


def test_0009_moves_the_batch_size_out_of_the_options_and_back(database_url):
    engine = make_engine(database_url)
    migrate(engine, "0008")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO batches (id, task, model, options, total, created_at) VALUES "
            "('b1', 'caption', 'm', '{\"batch_size\": 8, \"num_beams\": 2}', 0, CURRENT_TIMESTAMP),"
            " ('b2', 'classify', 'm', '{}', 0, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
    migrate(engine, "head")
    with engine.begin() as conn:
        rows = conn.execute(text("SELECT id, options, message_size FROM batches ORDER BY id"))
        assert [(r.id, _json(r.options), r.message_size) for r in rows] == [
            ("b1", {"num_beams": 2}, 8), ("b2", {}, None)
        ]  # fmt: skip
    migrate(engine, "0008", down=True)
    with engine.begin() as conn:
        rows = conn.execute(text("SELECT id, options FROM batches ORDER BY id"))
        assert [(r.id, _json(r.options)) for r in rows] == [
            ("b1", {"batch_size": 8, "num_beams": 2}), ("b2", {})
        ]  # fmt: skip
    engine.dispose()
