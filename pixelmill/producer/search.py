"""Search stored image embeddings by a sentence or an example image, and relabel an embed
batch with new labels, without the GPU.

Both need the model's other tower in the calling process: the text tower to embed the query
or the labels (and, for ``--image``, the image tower once). So this module, unlike the rest
of the producer, loads torch and the model (on the CPU by default: a ViT-B/32 loads in a few
seconds, then a query costs milliseconds). Submitting work never imports it.

The stored vectors are compared only with a query from the same model *revision*: a model
that resolves to another revision now (new weights) would give vectors in another space.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from pixelmill import tasks
from pixelmill.catalog import MAX_SEARCH_LIMIT
from pixelmill.db.embeddings import Embedded, embedded_models, nearest
from pixelmill.db.reads import get_batch
from pixelmill.db.relabel import EmbeddedJob, embedded_jobs, record_relabel
from pixelmill.errors import BadInput, InputError
from pixelmill.tasks.classify import ZERO_SHOT, ClassifyOptions

if TYPE_CHECKING:  # torch: imported when a model is loaded, so that a refusal is instant
    from pixelmill.models.clip import DualEncoderRunner

log = logging.getLogger(__name__)

MAX_LIMIT = MAX_SEARCH_LIMIT
RELABEL_DEVICE = "cpu (embeddings)"


@dataclass(frozen=True)
class SearchHit:
    rank: int
    score: float  # cosine similarity, -1..1
    input: str
    job_id: str
    batch_id: str

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": round(self.score, 6), "input": self.input,
                "job_id": self.job_id, "batch_id": self.batch_id}  # fmt: skip


@dataclass(frozen=True)
class Relabelled:
    batch_id: str  # the new classify batch
    source: str  # the embed batch
    model: str
    images: int


def scope_text(batch: str | None, source: str | None) -> str:
    if batch is not None:
        return f"batch {batch}"
    if source is not None:
        return f"inputs under {source!r}"
    return "this database"


class Searcher:
    """Query encoders, loaded once per process and model, and the searches and relabels that
    use them. ``device``: where the towers run (the CPU unless told)."""

    def __init__(self, sessions: sessionmaker[Session], *, device: str = "cpu") -> None:
        self.sessions = sessions
        self.device = device
        self._runners: dict[tuple[str, str], DualEncoderRunner[Any]] = {}
        self._lock = threading.Lock()

    def runner(self, kind: str, model: str) -> DualEncoderRunner[Any]:
        with self._lock:
            runner = self._runners.get((kind, model))
            if runner is None:
                from pixelmill.models.clip import DualEncoderRunner, quiet_loading
                from pixelmill.models.registry import create_runner

                quiet_loading()
                made = create_runner(kind, model)
                if not isinstance(made, DualEncoderRunner):
                    raise InputError(f"model {model!r} is not a CLIP-style dual encoder")
                made.load(self.device)
                runner = self._runners[(kind, model)] = made
            return runner

    # ---- search ----
    def choose(
        self, session: Session, model: str | None, batch: str | None, source: str | None
    ) -> list[Embedded]:
        """What is embedded in scope with the model to search: the one asked for, the batch's,
        or the only one there (one entry per revision); InputError naming what is missing or
        ambiguous."""
        if batch is not None and source is not None:
            raise InputError("give --batch or --source, not both")
        where = scope_text(batch, source)
        if batch is not None:
            found = get_batch(session, batch)
            if not tasks.get(found.task).embeds:
                raise InputError(
                    f"batch {batch} is a {found.task} batch: search runs over embed batches "
                    f"(pixelmill run embed INPUT... --model M)"
                )
            model = model or found.model
        there = embedded_models(session, batch=batch, source=source)
        if model is not None:
            there = [e for e in there if e.model == model]
        if not there:
            with_model = f" with model {model!r}" if model else ""
            run = f"pixelmill run embed INPUT... --model {model or 'M'}"
            raise InputError(f"no images in {where} were embedded{with_model}; run `{run}` first")
        models = sorted({e.model for e in there})
        if len(models) > 1:
            listed = ", ".join(
                f"{m} ({sum(e.count for e in there if e.model == m)} images)" for m in models
            )
            raise InputError(f"images in {where} were embedded with several models: {listed}; "
                             "pass --model")  # fmt: skip
        return there

    def search(
        self,
        query: str | None = None,
        *,
        image: str | None = None,
        model: str | None = None,
        batch: str | None = None,
        source: str | None = None,
        limit: int = 20,
    ) -> list[SearchHit]:
        """The ``limit`` stored images nearest the text ``query`` (or the image file
        ``image``), best first, each input once."""
        if (query is None) == (image is None):
            raise InputError("give a search text or --image FILE (one of the two)")
        if query is not None and not query.strip():
            raise InputError("the search text is empty")
        if not 1 <= limit <= MAX_LIMIT:
            raise InputError(f"--limit must be 1..{MAX_LIMIT}, not {limit}")
        if image is not None and not os.path.isfile(image):  # refused before the model loads
            raise InputError(f"--image {image}: no such file")
        with self.sessions() as session:
            there = self.choose(session, model, batch, source)
        name = there[0].model
        runner = self.runner("embed", name)
        revision = runner.revision or ""
        if revision not in {e.revision for e in there}:
            made = ", ".join(sorted({e.revision for e in there}))
            raise InputError(
                f"the images in {scope_text(batch, source)} were embedded with {name!r} at "
                f"revision {made}; it loads as {revision} now, and vectors of two revisions "
                "are not comparable: run embed again"
            )
        vector = self.embed_query(runner, query, image)
        with self.sessions() as session:
            hits = nearest(session, vector, model=name, revision=revision, batch=batch,
                           source=source, limit=limit)  # fmt: skip
        return [
            SearchHit(i + 1, h.score, h.input, h.job_id, h.batch_id) for i, h in enumerate(hits)
        ]

    def embed_query(
        self, runner: DualEncoderRunner[Any], query: str | None, image: str | None
    ) -> np.ndarray:
        if query is not None:
            text_vector: np.ndarray = runner.embed_texts([query.strip()])[0]
            return text_vector
        assert image is not None
        try:
            vector: np.ndarray = runner.embed_image(image)
            return vector
        except BadInput as exc:
            raise InputError(str(exc)) from None

    # ---- relabel ----
    def relabel(
        self,
        batch: str,
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        top_k: int | None = None,
        name: str | None = None,
    ) -> Relabelled:
        """Score ``labels`` against the embed batch's stored vectors (no image read) and record
        the result as a new classify batch (``top_k`` labels each, default the classifiers');
        returns it."""
        from pixelmill.models.classify import DEFAULT_TOP_K
        from pixelmill.models.clip import ZeroShotClassifier

        top_k = DEFAULT_TOP_K if top_k is None else top_k
        given: dict[str, Any] = {"labels": list(labels)}
        if templates:
            given["templates"] = list(templates)
        with self.sessions() as session:
            found = get_batch(session, batch)
            if not tasks.get(found.task).embeds:
                raise InputError(
                    f"batch {batch} is a {found.task} batch: --from-embeddings takes an embed "
                    "batch (pixelmill run embed INPUT... --model M)"
                )
            model = found.model
        classify = tasks.get("classify")
        options = classify.validate(given, model)
        assert isinstance(options, ClassifyOptions)
        runner = self.runner(ZERO_SHOT, model)
        assert isinstance(runner, ZeroShotClassifier)
        jobs: list[EmbeddedJob] = []
        results: list[dict[str, Any]] = []
        revision: str | None = None
        with self.sessions() as session:
            for chunk_jobs, vectors, chunk_revision in embedded_jobs(session, batch):
                revision = revision or chunk_revision
                if chunk_revision != revision:
                    raise InputError(f"batch {batch}'s embeddings come from several revisions")
                jobs += chunk_jobs
                results += runner.classify_vectors(vectors, options, top_k)
        if revision is None:
            raise InputError(f"batch {batch} has no embedded image yet (nothing done)")
        if revision != (runner.revision or ""):
            raise InputError(
                f"batch {batch} was embedded with {model!r} at revision {revision}; it loads as "
                f"{runner.revision} now, whose text vectors are not comparable: run embed again"
            )
        stored = options.model_dump(mode="json", exclude_none=True)
        with self.sessions.begin() as session:
            new = record_relabel(session, model=model, revision=revision, options=stored,
                                 recipe=classify.recipe(model, stored), jobs=jobs,
                                 results=results, device=RELABEL_DEVICE, name=name)  # fmt: skip
        return Relabelled(new, batch, model, len(jobs))
