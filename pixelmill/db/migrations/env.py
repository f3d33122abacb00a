"""Alembic environment. pixelmill runs migrations in code (``pixelmill.db.migrate.upgrade``), which
hands over an open connection; the ``alembic`` command line works too with
``-x url=...`` or PIXELMILL_DATABASE_URL set (read through the settings object)."""

from __future__ import annotations

from alembic import context

from pixelmill.db.schema import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from pixelmill.db.engine import make_engine
    from pixelmill.settings import load_settings

    url = context.get_x_argument(as_dictionary=True).get("url")
    engine = make_engine(url or load_settings().resolved_database_url())
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:  # as pixelmill.db.migrate does: a table copy must not cascade
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        _run(conn)
        conn.commit()
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # type: ignore[attr-defined]
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
