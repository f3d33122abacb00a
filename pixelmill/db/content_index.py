"""The content index: what is known about files (the stat fast path), which job computed the
result for which bytes (by recipe and model revision), and the revision each model last ran
as. The producer reads it to reuse earlier results; the worker writes it with each result.

Every write is an upsert keyed on the table's primary key, so concurrent producers and workers
never add a second row for the same thing."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Connection, Table, and_, select
from sqlalchemy.orm import Session

from pixelmill.db.schema import Batch, ContentResult, Job, ModelRevision, SeenFile, utcnow
from pixelmill.db.upsert import upsert

# Parameters per IN (...) lookup: well under SQLite's and PostgreSQL's limits.
LOOKUP_CHUNK = 2000

FILES = cast(Table, SeenFile.__table__)
CONTENT = cast(Table, ContentResult.__table__)
REVISIONS = cast(Table, ModelRevision.__table__)
JOBS = cast(Table, Job.__table__)
BATCHES = cast(Table, Batch.__table__)


@dataclass(frozen=True)
class FileStamp:
    """A file as last hashed: its size and modification time then (an object: its size and
    ETag), and its bytes' sha256."""

    size: int
    mtime_ns: int
    sha256: str
    etag: str | None = None
    inode: int | None = None


@dataclass(frozen=True)
class EarlierResult:
    """A result the index holds for some bytes: its recipe, model revision and job."""

    recipe: str
    revision: str
    job_id: str


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), LOOKUP_CHUNK):
        yield items[start : start + LOOKUP_CHUNK]


def known_files(session: Session, paths: Sequence[str]) -> dict[str, FileStamp]:
    """What the index recorded for ``paths`` (those it has)."""
    conn = session.connection()
    out: dict[str, FileStamp] = {}
    for chunk in _chunks(paths):
        for path, size, mtime_ns, sha, etag, inode in conn.execute(
            select(FILES.c.path, FILES.c.size, FILES.c.mtime_ns, FILES.c.sha256, FILES.c.etag,
                   FILES.c.inode)
            .where(FILES.c.path.in_(chunk))
        ):  # fmt: skip
            out[path] = FileStamp(size, mtime_ns, sha, etag, inode)
    return out


def known_objects(
    session: Session, etags: Collection[tuple[str, int]]
) -> dict[tuple[str, int], str]:
    """The sha256 of objects seen anywhere with these (ETag, size): the same bytes copied or
    renamed to another key, recognised without fetching them."""
    conn = session.connection()
    wanted = sorted({etag for etag, _ in etags})
    out: dict[tuple[str, int], str] = {}
    for chunk in _chunks(wanted):
        for etag, size, sha in conn.execute(
            select(FILES.c.etag, FILES.c.size, FILES.c.sha256).where(FILES.c.etag.in_(chunk))
        ):
            out[(etag, size)] = sha
    return out


def remember_files(session: Session, stamps: Mapping[str, FileStamp]) -> None:
    """Record (or update) what was just hashed."""
    if not stamps:
        return
    now = utcnow()
    rows = [
        {
            "path": p,
            "size": s.size,
            "mtime_ns": s.mtime_ns,
            "inode": s.inode,
            "etag": s.etag,
            "sha256": s.sha256,
            "checked_at": now,
        }
        for p, s in stamps.items()
    ]
    upsert(session.connection(), FILES, rows, key=["path"])


def earlier_results(
    session: Session, task: str, model: str, shas: Iterable[str]
) -> dict[str, list[EarlierResult]]:
    """Every result the index holds for these bytes with ``task`` and ``model`` (any recipe,
    any revision): the caller tells the current one from the stale ones."""
    conn = session.connection()
    wanted = sorted(set(shas))
    out: dict[str, list[EarlierResult]] = {}
    for chunk in _chunks(wanted):
        for sha, rec, rev, job_id in conn.execute(
            select(CONTENT.c.content_sha256, CONTENT.c.recipe, CONTENT.c.model_revision,
                   CONTENT.c.job_id)
            .where(CONTENT.c.content_sha256.in_(chunk), CONTENT.c.task == task,
                   CONTENT.c.model == model)
        ):  # fmt: skip
            out.setdefault(sha, []).append(EarlierResult(rec, rev, job_id))
    return out


def index_results(conn: Connection, job_ids: Sequence[str], revision: str | None) -> None:
    """Add the just-finished ``job_ids`` (done, with ``revision``) to the content index, where
    their batch has a recipe and the job a content hash. An entry already there is kept: it
    names the job that computed the result first."""
    if revision is None or not job_ids:
        return
    now = utcnow()
    for chunk in _chunks(job_ids):
        rows = [
            {"content_sha256": r.content_sha256, "recipe": r.recipe, "model_revision": revision,
             "task": r.task, "model": r.model, "job_id": r.id, "created_at": now}
            for r in conn.execute(
                select(JOBS.c.id, JOBS.c.content_sha256, BATCHES.c.recipe, BATCHES.c.task,
                       BATCHES.c.model)
                .join(BATCHES, BATCHES.c.id == JOBS.c.batch_id)
                .where(JOBS.c.id.in_(chunk), JOBS.c.content_sha256.is_not(None),
                       BATCHES.c.recipe.is_not(None))
            )
        ]  # fmt: skip
        if rows:
            upsert(
                conn,
                CONTENT,
                rows,
                key=["content_sha256", "recipe", "model_revision"],
                update=False,
            )


def recorded_revision(session: Session, task: str, model: str) -> tuple[str, datetime] | None:
    """The revision the workers last ran ``model`` as for ``task``, and when."""
    row = session.execute(
        select(REVISIONS.c.revision, REVISIONS.c.seen_at).where(
            and_(REVISIONS.c.task == task, REVISIONS.c.model == model)
        )
    ).first()
    return (row.revision, row.seen_at) if row is not None else None


def record_revision(session: Session, task: str, model: str, revision: str) -> None:
    """A worker loaded ``model`` for ``task`` as ``revision``."""
    row = {"task": task, "model": model, "revision": revision, "seen_at": utcnow()}
    upsert(session.connection(), REVISIONS, [row], key=["task", "model"])
