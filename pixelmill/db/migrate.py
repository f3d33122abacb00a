"""Bring a database to the newest schema with Alembic, safely from several processes at once."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

MIGRATIONS = Path(__file__).with_name("migrations")
PG_LOCK_KEY = 0x706978656C  # "pixel"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """``alembic upgrade head``, serialised across processes; a no-op when already there."""
    head = head_revision()
    if current_revision(engine) == head:
        return
    with _migration_lock(engine) as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return
        _migrate(conn, command.upgrade, "head")


def migrate(engine: Engine, target: str, *, down: bool = False) -> None:
    """``alembic upgrade TARGET`` (``downgrade`` with ``down``), serialised as ``upgrade``."""
    with _migration_lock(engine) as conn:
        _migrate(conn, command.downgrade if down else command.upgrade, target)


def _migrate(conn: Connection, action: Any, target: str) -> None:
    """Run ``action`` to ``target`` on ``conn`` and commit. On SQLite, foreign keys are off
    meanwhile: a migration that must copy a table (SQLite cannot alter a constraint) drops
    the old one, which would otherwise cascade into every table that references it. They
    are checked after the commit, then on again."""
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        conn.commit()  # a PRAGMA foreign_keys inside a transaction does nothing
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        action(cfg, target)
        conn.commit()
        if sqlite:
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise RuntimeError(f"migration to {target} broke foreign keys: {broken[:5]}")
    finally:
        if sqlite:
            conn.rollback()
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        with engine.connect() as conn:
            yield conn
        return
    lock_path = Path(database).expanduser().with_suffix(".migrate.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
