"""INSERT .. ON CONFLICT, on PostgreSQL and SQLite alike (the two databases pixelmill runs on)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table


def upsert(
    conn: Connection,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    key: Sequence[str],
    update: bool = True,
    keep: Sequence[str] = (),
) -> None:
    """Insert ``rows``; a row whose ``key`` exists already is updated (``update``: every column
    but the key and ``keep``) or left as it is. One cached statement, executemany (a multi-row
    VALUES would be compiled each time): a redelivered batch rewrites the same rows."""
    if not rows:
        return
    dialect = conn.dialect.name
    if dialect not in ("postgresql", "sqlite"):  # pragma: no cover - settings refuse others
        raise NotImplementedError(dialect)
    # The dialects' INSERTs here, not at import: reading commands (status) never need them.
    from sqlalchemy.dialects import postgresql, sqlite

    stmt: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    if update:
        kept = {*key, *keep}
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key), set_={c: stmt.excluded[c] for c in rows[0] if c not in kept}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(key))
    conn.execute(stmt, rows)
