"""What `pixelmill bench-search` measures: how long one search takes over many stored embeddings.

Fills a throwaway database (a temporary SQLite file, or the empty PostgreSQL database
``--database`` names) with ``--rows`` synthetic unit-length embeddings (one embed batch of done
jobs, as workers would leave them), then times ``pixelmill.db.embeddings.nearest`` -- what
`pixelmill search` runs once the query is embedded -- for ``--queries`` random queries: the
first, the median and the slowest, and the rows scanned per second. It says whether
pgvector's index answered or the vectors were scanned.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

MODEL, REVISION = "synthetic", "bench"
CHUNK = 10_000


def fill(url: str, rows: int, dim: int, say: Any) -> float:
    """``rows`` done jobs with embeddings in one batch; returns the seconds it took."""
    from sqlalchemy import insert

    from pixelmill.db.embeddings import EmbeddingRow, write_embeddings
    from pixelmill.db.engine import make_engine
    from pixelmill.db.migrate import upgrade
    from pixelmill.db.schema import Batch, Job, JobStatus, utcnow

    engine = make_engine(url)
    try:
        upgrade(engine)
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        batch = str(uuid.uuid4())
        now = utcnow()
        with engine.begin() as conn:
            conn.execute(insert(Batch.__table__), [{  # type: ignore[arg-type]
                "id": batch, "task": "embed", "model": MODEL, "options": {}, "total": rows,
                "created_at": now, "priority": "normal"}])  # fmt: skip
        for first in range(0, rows, CHUNK):
            n = min(CHUNK, rows - first)
            vectors = rng.standard_normal((n, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            ids = [str(uuid.uuid4()) for _ in range(n)]
            with engine.begin() as conn:
                conn.execute(insert(Job.__table__), [  # type: ignore[arg-type]
                    {"id": ids[i], "batch_id": batch, "seq": first + i,
                     "input": f"/archive/{(first + i) // 1000:04d}/img{first + i:07d}.jpg",
                     "status": JobStatus.done, "attempts": 1, "created_at": now,
                     "finished_at": now} for i in range(n)])  # fmt: skip
                # As a worker writes them (with pgvector: the vector column and its index).
                write_embeddings(conn, [EmbeddingRow(ids[i], MODEL, REVISION,
                                                     vectors[i].astype("<f4").tobytes())
                                        for i in range(n)])  # fmt: skip
            if (first // CHUNK) % 20 == 0:
                say(f"{first + n:,} / {rows:,} rows")
        return time.perf_counter() - start
    finally:
        engine.dispose()


def measure(url: str, dim: int, queries: int) -> dict[str, Any]:
    from pixelmill.db.embeddings import nearest, pgvector_enabled
    from pixelmill.db.engine import make_engine, make_sessionmaker

    engine = make_engine(url)
    rng = np.random.default_rng(1)
    times = []
    try:
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            indexed = pgvector_enabled(session.connection())
        for _ in range(queries):
            query = rng.standard_normal(dim).astype(np.float32)
            with sessions() as session:
                start = time.perf_counter()
                hits = nearest(session, query, model=MODEL, revision=REVISION, limit=20)
                times.append(time.perf_counter() - start)
            assert len(hits) == 20
    finally:
        engine.dispose()
    return {"indexed": indexed, "times": times}


def run_search_bench(
    rows: int, dim: int, queries: int, database: str | None, say: Any
) -> dict[str, Any]:
    """Fill ``database`` (default: a temporary SQLite file, removed afterwards) and time
    ``queries`` searches: the figures `pixelmill bench-search` prints."""
    work = Path(tempfile.mkdtemp(prefix="pixelmill-bench-search-"))
    url = database or f"sqlite:///{work / 'search.db'}"
    try:
        filled = fill(url, rows, dim, say)
        say(f"filled in {filled:.1f} s; searching")
        got = measure(url, dim, queries)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"url": url, "filled": filled, **got}
