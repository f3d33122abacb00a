"""Image embeddings (task ``embed``): stored with the job that made them, read back for search
and for relabelling without the GPU.

Storage: float32, little-endian bytes in ``embeddings.vector`` on every database. Where the
PostgreSQL server has pgvector, migration 0008 adds ``embeddings.vec vector`` beside it: the
worker fills both, search orders by ``vec`` (an HNSW index per dimension, made on first use)
and everything else reads the bytes. Without pgvector (always on SQLite), search is one
vectorised scan (numpy) over the rows in scope, read in chunks; this is said once per process
in the log.

A job reused at submit (``jobs.reused_from``) has the embedding of the job it reused, like its
result; readers join on ``coalesce(reused_from, id)``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from sqlalchemy import Connection, Engine, Table, func, select, text
from sqlalchemy.orm import Session

from pixelmill.db.schema import Embedding, Job, JobStatus, utcnow
from pixelmill.db.upsert import upsert

log = logging.getLogger(__name__)

EMBEDDINGS = cast(Table, Embedding.__table__)
DTYPE = np.dtype("<f4")
# Rows per chunk of a scan: ~40 MB of 512-d vectors at a time.
SCAN_CHUNK = 20_000
# Candidates kept per chunk, as a multiple of the hits asked for, before duplicates of one
# input (the same image in several batches) are folded; widened and re-run if too few remain.
SLACK = 8
# The most candidates asked of pgvector's index at once (its ef_search limit); past that, scan.
MAX_EF_SEARCH = 1000


def to_bytes(vector: Any) -> bytes:
    """A 1-d float vector as the stored bytes (float32, little-endian)."""
    arr = np.asarray(vector, dtype=DTYPE)
    if arr.ndim != 1 or not arr.size:
        raise ValueError(f"an embedding must be a non-empty 1-d vector, got shape {arr.shape}")
    return arr.tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=DTYPE)


def normalised(vector: Any) -> np.ndarray:
    """``vector`` as float32 with unit L2 norm (a zero vector stays zero)."""
    arr = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(arr))
    return arr / norm if norm > 0 else arr


# ---- pgvector -------------------------------------------------------------------------------

_vector_columns: dict[str, bool] = {}
_indexed_dims: set[tuple[str, int]] = set()
_lock = threading.Lock()


def _engine_key(conn: Connection) -> str:
    return conn.engine.url.render_as_string(hide_password=True)


def pgvector_enabled(conn: Connection) -> bool:
    """Whether this database has the ``vec`` column (PostgreSQL with pgvector at migration
    0008). Looked up once per process and database; on PostgreSQL without it, says once in
    the log that search is not indexed."""
    key = _engine_key(conn)
    with _lock:
        known = _vector_columns.get(key)
    if known is not None:
        return known
    has = conn.dialect.name == "postgresql" and bool(
        conn.execute(
            text("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                 "'embeddings' AND column_name = 'vec' AND table_schema = current_schema()")
        ).scalar()
    )  # fmt: skip
    with _lock:
        if key not in _vector_columns and conn.dialect.name == "postgresql" and not has:
            log.warning(
                "pgvector is not installed in this PostgreSQL: embeddings are stored as blobs "
                "and search scans them (not indexed)"
            )
        _vector_columns[key] = has
    return has


def forget_vector_support(engine: Engine | None = None) -> None:
    """Look pgvector up again (after a migration; tests)."""
    with _lock:
        if engine is None:
            _vector_columns.clear()
            _indexed_dims.clear()
        else:
            key = engine.url.render_as_string(hide_password=True)
            _vector_columns.pop(key, None)
            _indexed_dims.difference_update({k for k in _indexed_dims if k[0] == key})


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


def _ensure_index(conn: Connection, dim: int) -> None:
    """An HNSW index (inner product: the vectors are unit length) over the ``dim``-long
    vectors, made once; a failure (a concurrent worker making the same one) is only logged."""
    key = (_engine_key(conn), dim)
    if key in _indexed_dims:
        return
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(
                f"CREATE INDEX IF NOT EXISTS ix_embeddings_vec_{int(dim)} ON embeddings "
                f"USING hnsw ((vec::vector({int(dim)})) vector_ip_ops) WHERE dim = {int(dim)}"
            )
    except Exception as exc:  # noqa: BLE001 - an index is an optimisation: never fail a write
        log.warning("cannot create the pgvector index for %d-d embeddings: %s", dim, exc)
        return
    _indexed_dims.add(key)


# ---- writing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingRow:
    job_id: str
    model: str
    revision: str
    vector: bytes  # float32 LE (``to_bytes``)


def write_embeddings(conn: Connection, rows: Sequence[EmbeddingRow]) -> None:
    """Upsert the rows (a redelivered message rewrites the same ones); with pgvector, fill
    ``vec`` too."""
    if not rows:
        return
    now = utcnow()
    upsert(
        conn,
        EMBEDDINGS,
        [
            {"job_id": r.job_id, "model": r.model, "model_revision": r.revision,
             "dim": len(r.vector) // DTYPE.itemsize, "vector": r.vector, "created_at": now}
            for r in rows
        ],
        key=["job_id"],
        keep=["created_at"],
    )  # fmt: skip
    if not pgvector_enabled(conn):
        return
    conn.execute(
        text("UPDATE embeddings SET vec = CAST(:vec AS vector) WHERE job_id = :job"),
        [{"job": r.job_id, "vec": _vector_literal(from_bytes(r.vector))} for r in rows],
    )
    for dim in sorted({len(r.vector) // DTYPE.itemsize for r in rows}):
        _ensure_index(conn, dim)


# ---- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedded:
    """What has embeddings in a scope: a model, the revision it ran as, the dimension, how
    many done jobs."""

    model: str
    revision: str
    dim: int
    count: int


@dataclass(frozen=True)
class Hit:
    job_id: str
    batch_id: str
    input: str
    score: float  # cosine similarity, -1..1


def _source() -> Any:
    return func.coalesce(Job.reused_from, Job.id)


def _scoped(stmt: Any, *, batch: str | None, source: str | None) -> Any:
    stmt = stmt.where(Job.status == JobStatus.done)
    if batch is not None:
        stmt = stmt.where(Job.batch_id == batch)
    if source is not None:
        stmt = stmt.where(Job.input.startswith(source, autoescape=True))
    return stmt


def embedded_models(
    session: Session, *, batch: str | None = None, source: str | None = None
) -> list[Embedded]:
    """The (model, revision, dim) with embeddings in scope, the most rows first."""
    stmt = _scoped(
        select(Embedding.model, Embedding.model_revision, Embedding.dim, func.count())
        .join(Job, _source() == Embedding.job_id)
        .group_by(Embedding.model, Embedding.model_revision, Embedding.dim),
        batch=batch,
        source=source,
    )
    rows = [Embedded(m, r, d, n) for m, r, d, n in session.execute(stmt)]
    return sorted(rows, key=lambda e: (-e.count, e.model, e.revision))


def scope_vectors(
    session: Session,
    *,
    model: str,
    revision: str,
    batch: str | None = None,
    source: str | None = None,
    chunk: int = SCAN_CHUNK,
) -> Iterator[tuple[list[tuple[str, str, str]], np.ndarray]]:
    """The done jobs in scope with an embedding by ``model`` at ``revision``, in chunks:
    ``[(job_id, batch_id, input)], matrix`` (one float32 row per job)."""
    # Unscoped: every vector once, with the job that computed it (a join on the primary key);
    # a scope also counts the jobs that reused a vector (found from the jobs' side).
    joined = _source() if batch is not None or source is not None else Job.id
    stmt = _scoped(
        select(Job.id, Job.batch_id, Job.input, Embedding.vector)
        .join(Embedding, joined == Embedding.job_id)
        .where(Embedding.model == model, Embedding.model_revision == revision),
        batch=batch,
        source=source,
    )
    # Core rows, streamed (three times the ORM's speed here: a scan is all row handling).
    result = session.connection().execute(stmt.execution_options(stream_results=True))
    while part := result.fetchmany(chunk):
        refs = [(r[0], r[1], r[2]) for r in part]
        matrix = np.frombuffer(b"".join(r[3] for r in part), dtype=DTYPE)
        yield refs, matrix.reshape(len(refs), -1)


def nearest(
    session: Session,
    query: Any,
    *,
    model: str,
    revision: str,
    batch: str | None = None,
    source: str | None = None,
    limit: int = 20,
) -> list[Hit]:
    """The ``limit`` inputs in scope whose embeddings are nearest ``query`` (cosine), best
    first; an input in several batches appears once (its best job). Over everything
    embedded with the model, through pgvector's index where it is there; a scope (``batch``,
    ``source``: the jobs that reused a vector count too) and a database without pgvector are
    scanned."""
    q = normalised(query)
    slack = SLACK
    indexed = batch is None and source is None and pgvector_enabled(session.connection())
    while True:
        if indexed and limit * slack <= MAX_EF_SEARCH:
            candidates, complete = _pgvector_candidates(
                session, q, model, revision, batch, source, limit * slack
            )
        else:
            candidates, complete = _scan_candidates(
                session, q, model, revision, batch, source, limit * slack
            )
        hits = _fold(candidates, limit)
        if len(hits) >= limit or complete:
            return hits
        slack *= SLACK


def _fold(candidates: list[Hit], limit: int) -> list[Hit]:
    """Best first, one hit per input."""
    out: list[Hit] = []
    seen: set[str] = set()
    for hit in sorted(candidates, key=lambda h: (-h.score, h.input, h.job_id)):
        if hit.input in seen:
            continue
        seen.add(hit.input)
        out.append(hit)
        if len(out) == limit:
            break
    return out


def _scan_candidates(
    session: Session,
    q: np.ndarray,
    model: str,
    revision: str,
    batch: str | None,
    source: str | None,
    keep: int,
) -> tuple[list[Hit], bool]:
    """The ``keep`` best rows of every chunk; complete when no chunk had more than that."""
    candidates: list[Hit] = []
    complete = True
    for refs, matrix in scope_vectors(
        session, model=model, revision=revision, batch=batch, source=source
    ):
        if matrix.shape[1] != q.shape[0]:
            raise ValueError(
                f"the query has {q.shape[0]} dimensions, the stored embeddings {matrix.shape[1]}"
            )
        scores = matrix @ q
        if len(scores) > keep:
            complete = False
            idx = np.argpartition(-scores, keep - 1)[:keep]
        else:
            idx = np.arange(len(scores))
        candidates.extend(
            Hit(refs[i][0], refs[i][1], refs[i][2], float(scores[i])) for i in idx.tolist()
        )
        candidates = _fold(candidates, keep) if len(candidates) > 4 * keep else candidates
    return candidates, complete


def _pgvector_candidates(
    session: Session,
    q: np.ndarray,
    model: str,
    revision: str,
    batch: str | None,
    source: str | None,
    keep: int,
) -> tuple[list[Hit], bool]:
    """The ``keep`` nearest vectors of the model by pgvector's HNSW index (``<#>``: the negated
    inner product; the vectors are unit length), each with the job that computed it. The
    index is asked for ``keep`` candidates (``hnsw.ef_search``) and, on pgvector 0.8+, to go
    on past rows of other models (``hnsw.iterative_scan``)."""
    assert batch is None and source is None  # a scope is scanned (``nearest``)
    dim = int(q.shape[0])
    conn = session.connection()
    conn.execute(text(f"SET LOCAL hnsw.ef_search = {max(40, int(keep))}"))
    try:
        with conn.begin_nested():
            conn.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
    except Exception:  # noqa: BLE001 - pgvector before 0.8: no iterative scans
        log.debug("pgvector without iterative scans")
    sql = text(
        "SELECT j.id, j.batch_id, j.input, -c.distance FROM ("
        f"SELECT e.job_id, (e.vec::vector({dim})) <#> CAST(:q AS vector({dim})) AS distance "
        "FROM embeddings e WHERE e.model = :model AND e.model_revision = :revision "
        f"AND e.dim = {dim} ORDER BY distance LIMIT :keep) c "
        "JOIN jobs j ON j.id = c.job_id ORDER BY c.distance"
    )
    rows = conn.execute(
        sql, {"model": model, "revision": revision, "q": _vector_literal(q), "keep": keep}
    ).all()
    return [Hit(r[0], r[1], r[2], float(r[3])) for r in rows], len(rows) < keep


def job_embeddings(session: Session, job_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The embeddings of these jobs (their own, or the reused job's), by job id."""
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(job_ids), 2000):
        chunk = job_ids[start : start + 2000]
        for job_id, vector in session.execute(
            select(Job.id, Embedding.vector)
            .join(Embedding, _source() == Embedding.job_id)
            .where(Job.id.in_(chunk))
        ):
            out[job_id] = from_bytes(vector)
    return out
