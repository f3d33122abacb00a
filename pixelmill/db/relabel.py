"""Relabelling from stored embeddings: an embed batch's vectors read in submission order, and
the scores recorded as a new classify batch, exactly as if workers had run it (done jobs,
results, the content index), so ``results``, ``export`` and the dashboard show it and a later
zero-shot classify of the same bytes, labels and model revision reuses it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pixelmill.db.embeddings import DTYPE
from pixelmill.db.jobs import create_batch, write_outcomes
from pixelmill.db.records import Outcome
from pixelmill.db.schema import Embedding, Job, JobStatus

# Rows per chunk read back (~40 MB of 512-d vectors).
CHUNK = 20_000


@dataclass(frozen=True)
class EmbeddedJob:
    job_id: str
    input: str
    content_sha256: str | None


def embedded_jobs(
    session: Session, batch_id: str, *, chunk: int = CHUNK
) -> Iterator[tuple[list[EmbeddedJob], np.ndarray, str]]:
    """The batch's done jobs that have an embedding (their own or the reused job's), in
    submission order, in chunks: the jobs, one float32 row per job, and the revision of the
    chunk's first row (all rows of one embed batch share the model; a revision change midway
    is the caller's to refuse)."""
    source = func.coalesce(Job.reused_from, Job.id)
    stmt = (
        select(Job.id, Job.input, Job.content_sha256, Embedding.vector, Embedding.model_revision)
        .join(Embedding, source == Embedding.job_id)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.done)
        .order_by(Job.seq)
    )
    result = session.connection().execute(stmt.execution_options(stream_results=True))
    while part := result.fetchmany(chunk):
        jobs = [EmbeddedJob(r[0], r[1], r[2]) for r in part]
        revisions = {r[4] for r in part}
        if len(revisions) > 1:
            raise ValueError(f"the batch's embeddings come from several revisions: {revisions}")
        matrix = np.frombuffer(b"".join(r[3] for r in part), dtype=DTYPE)
        yield jobs, matrix.reshape(len(jobs), -1), part[0][4]


def record_relabel(
    session: Session,
    *,
    model: str,
    revision: str,
    options: dict[str, Any],
    recipe: str | None,
    jobs: Sequence[EmbeddedJob],
    results: Sequence[dict[str, Any]],
    device: str,
    name: str | None = None,
) -> str:
    """A new classify batch whose jobs (one per ``jobs``, same inputs and content hashes) are
    done with ``results``; returns its id. The caller commits."""
    if len(jobs) != len(results):
        raise ValueError(f"{len(results)} results for {len(jobs)} jobs")
    new = create_batch(
        session,
        task="classify",
        model=model,
        inputs=[j.input for j in jobs],
        options=options,
        name=name,
        contents=[j.content_sha256 for j in jobs],
        recipe=recipe,
    )
    write_outcomes(
        session,
        [
            Outcome(job_id=job_id, result=result, model=model, model_revision=revision,
                    device=device)
            for job_id, result in zip(new.job_ids, results, strict=True)
        ],
    )  # fmt: skip
    return new.batch_id
