"""Engine and session factory; ``open_database`` (``configured_database``: the settings' one)
makes both, on a database migrated to the newest schema. SQLite gets WAL and a busy timeout so
that a producer and several worker processes can share one database file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pixelmill.errors import ConfigError, ServiceUnavailable

if TYPE_CHECKING:
    from pixelmill.settings import Settings


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver we ship), not psycopg2."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(url: str, *, create: bool = True, parents: bool = False) -> Engine:
    """An engine for ``url``. A SQLite file that does not exist is created (on first use) only
    with ``create``: commands that only read pass ``create=False`` and get a ConfigError "no
    database at PATH" instead of a new empty database. Its folder must exist unless
    ``parents`` (the embedded default: pixelmill owns its data dir); a configured path in a
    folder that is not there is a ConfigError naming the folder, not a new directory tree."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises several types here
        raise ConfigError(f"PIXELMILL_DATABASE_URL: cannot parse the URL ({exc})") from None
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_file(parsed)
        if path is not None:
            _check_sqlite_location(path, create=create, parents=parents)
        kwargs["connect_args"] = {"timeout": 60}
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs["pool_pre_ping"] = True
    return create_engine(url, **kwargs)


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database or a ``uri=true``
    URL (whose ``database`` is a ``file:`` URI)."""
    if not url.database or url.database == ":memory:" or url.query.get("uri"):
        return None
    return Path(url.database).expanduser()


def _check_sqlite_location(path: Path, *, create: bool, parents: bool) -> None:
    if path.exists():
        return
    if not create:
        raise ConfigError(f"no database at {path} (nothing submitted yet?)")
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise ConfigError(
            f"PIXELMILL_DATABASE_URL: the folder {path.parent} does not exist (create it, or "
            "fix the path)"
        )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@dataclass(frozen=True)
class Database:
    """An engine and its session factory; ``dispose()`` (or leaving a ``with``) closes the
    engine's connections."""

    engine: Engine
    sessions: sessionmaker[Session]

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()


def open_database(
    url: str, *, create: bool = True, parents: bool = False, migrate: bool = True
) -> Database:
    """The database at ``url`` (``create`` and ``parents`` as for ``make_engine``), brought to
    the newest schema first unless ``migrate=False`` (then nothing connects yet: only a SQLite
    file's location is checked). The engine is disposed of if the migration fails."""
    engine = make_engine(url, create=create, parents=parents)
    if migrate:
        try:
            if not _at_head(engine):
                from pixelmill.db.migrate import upgrade  # Alembic only when it is needed

                upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
    return Database(engine, make_sessionmaker(engine))


# The migrations, each named "<revision>_<what>.py" with revisions 0001, 0002, ... in order:
# the newest file's is the head (tests/test_db.py checks that it is Alembic's).
VERSIONS = Path(__file__).with_name("migrations") / "versions"


def newest_revision() -> str:
    return max(p.name.split("_", 1)[0] for p in VERSIONS.glob("[0-9][0-9][0-9][0-9]_*.py"))


def _at_head(engine: Engine) -> bool:
    """Whether the database is at the newest schema, read without Alembic (whose import and
    scan of the migrations are most of a light command's start): one SELECT. False for a
    database without the version table (new); then ``upgrade`` decides. A database that
    cannot be reached raises here, once, not again in ``upgrade``."""
    with engine.connect() as conn:
        try:
            found = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars()
            return list(found) == [newest_revision()]
        except SQLAlchemyError:
            return False


def configured_database(
    settings: Settings, *, create: bool = True, migrate: bool = True
) -> Database:
    """``open_database`` on the settings' database: PIXELMILL_DATABASE_URL (whose SQLite
    folder must exist), or the embedded default in the data dir (its folder created)."""
    return open_database(
        settings.resolved_database_url(),
        create=create,
        parents=settings.database_url is None,
        migrate=migrate,
    )


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """For the commands: a database that cannot be reached is a ``ServiceUnavailable`` (exit
    3, one line) instead of SQLAlchemy's traceback. Inside, code that retries a lost database
    catches ``OperationalError`` itself; this is the outermost word on it."""
    try:
        yield
    except OperationalError as exc:
        raise ServiceUnavailable(f"cannot reach the database: {str(exc.orig).strip()}") from exc
