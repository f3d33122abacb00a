"""The embed task end to end through the real parts: `pixelmill run` processes, Redis, worker
processes, SQLite and PostgreSQL (without pgvector: embeddings stored as blobs), a tiny CLIP
loaded from a folder. Each vector stored is checked against the runner's own embedding of the
file, computed here."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, text

from pixelmill.db.embeddings import (
    forget_vector_support,
    from_bytes,
    job_embeddings,
    nearest,
    pgvector_enabled,
    to_bytes,
)
from pixelmill.db.engine import make_engine, make_sessionmaker
from pixelmill.db.jobs import claim_jobs, create_batch, write_outcomes
from pixelmill.db.migrate import upgrade
from pixelmill.db.records import Outcome
from pixelmill.db.schema import Embedding, Job
from pixelmill.models.base import Runner
from pixelmill.models.clip import EMBEDDING
from pixelmill.models.registry import create_runner
from pixelmill.producer import Client
from pixelmill.producer.reuse import RACY_SECONDS
from pixelmill.settings import load_settings
from pixelmill.tasks import task_options
from tests.conftest import pixelmill, pixelmill_env
from tests.tiny_models import build_tiny_clip

pytestmark = pytest.mark.slow
T = TypeVar("T")

# Short leases, so that a killed worker's jobs come back within a test's patience.
FAST = {"lease_seconds": "4", "queued_lease_seconds": "3", "reconcile_interval": "1",
        "max_attempts": "3"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def embedder(tiny_clip: Path) -> Runner[Any]:
    """The runner the worker loads, here in the test: what each stored vector must equal."""
    runner = create_runner("embed", str(tiny_clip))
    runner.load("cpu")
    return runner


def _embedding_of(runner: Runner[Any], path: Path) -> np.ndarray:
    options = task_options("embed", {}, runner.name)
    (out,) = runner.run([runner.prepare(str(path), {}, options)], options)
    return np.asarray(out[EMBEDDING])


def _image(path: Path, seed: int, size: tuple[int, int]) -> Path:
    """A distinct image per seed: smooth colour ramps and a block of noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    rgb = np.stack([(base[0] + x * 3) % 256, (base[1] + y * 2) % 256,
                    np.full_like(x, base[2])], axis=-1)  # fmt: skip
    rgb[: h // 3, : w // 3] = rng.integers(0, 256, (h // 3, w // 3, 3))
    Image.fromarray(rgb.astype(np.uint8)).save(path, quality=92)
    old = time.time() - 10 * RACY_SECONDS  # older than the racy window: remembered by stat
    os.utime(path, (old, old))
    return path


def _archive(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        _image(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}", i, (40 + 7 * i, 90 - 3 * i))
        for i in range(n)
    ]


def _corrupt(path: Path) -> Path:
    """A PNG whose pixel data and CRC are smashed."""
    Image.new("RGB", (64, 64), (0, 128, 0)).save(path)
    raw = bytearray(path.read_bytes())
    raw[60:120] = b"\x00" * 60
    path.write_bytes(bytes(raw))
    return path


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _embedding_rows(url: str) -> dict[str, tuple[str, str, int, bytes]]:
    """job_id -> (model, revision, dim, vector bytes): the whole table."""
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = session.execute(
                select(Embedding.job_id, Embedding.model, Embedding.model_revision,
                       Embedding.dim, Embedding.vector)
            ).all()  # fmt: skip
    finally:
        engine.dispose()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def _until(check: Callable[[], T], what: str, timeout: float = 120) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


# ---- night after night ----------------------------------------------------------------------


def test_embed_night_after_night(database_url, tmp_path, redis_server, start_worker, tiny_clip,
                                 embedder):  # fmt: skip
    """Three nights of `pixelmill run embed` over one archive, served by one worker (as a fleet
    would: the runs start none of their own)."""
    archive = tmp_path / "archive"
    files = _archive(archive, 10)
    bad = _corrupt(archive / "broken.png")
    env = pixelmill_env(data_dir=str(tmp_path / "data"), database_url=database_url,
                        broker_url=redis_server.url)  # fmt: skip
    start_worker(env)
    night = ("run", "embed", str(archive), "--model", str(tiny_clip), "--json",
             "--no-local-workers", "--timeout", "120")  # fmt: skip

    first = pixelmill(*night, env=env)
    assert first.returncode == 1, first.stderr  # one job failed
    rows = {Path(r["input"]).name: r for r in _lines(first.stdout)}
    assert len(rows) == 11
    broken = rows.pop(bad.name)
    assert broken["status"] == "failed" and broken["result"] is None
    assert bad.name in broken["error"] and "image" in broken["error"], broken["error"]
    assert {r["status"] for r in rows.values()} == {"done"}
    assert all(r["result"] == {"dim": 16} and not r["reused"] for r in rows.values())
    revision = embedder.revision
    assert revision is not None and revision.startswith("local-")
    assert {r["revision"] for r in rows.values()} == {revision}

    stored = _embedding_rows(database_url)
    assert set(stored) == {r["job"] for r in rows.values()}  # one row per done job, no other
    for path in files:
        model, rev, dim, blob = stored[rows[path.name]["job"]]
        assert (model, rev, dim) == (str(tiny_clip), revision, 16)
        vector = from_bytes(blob)
        assert vector.dtype == np.float32 and vector.shape == (16,)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(vector, _embedding_of(embedder, path), atol=1e-5)
    if database_url.startswith("postgresql"):  # pgvector's column only where it is installed
        engine = make_engine(database_url)
        with engine.connect() as conn:
            has = _pgvector_installable(conn)
            columns = (
                conn.execute(
                    text(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_name = 'embeddings'"
                    )
                )
                .scalars()
                .all()
            )
            assert ("vec" in columns) == has
            forget_vector_support(engine)
            assert pgvector_enabled(conn) is has
        engine.dispose()

    # The next night, the same command: every image reused, nothing computed again.
    second = pixelmill(*night, env=env)
    assert second.returncode == 1, second.stderr  # the broken file fails again
    again = {Path(r["input"]).name: r for r in _lines(second.stdout)}
    assert "(1 new, 0 changed, 0 stale, 10 reused)" in second.stderr, second.stderr
    assert again.pop(bad.name)["status"] == "failed"
    for name, row in again.items():
        assert row["status"] == "done" and row["reused"], row
        assert row["reused_from"] == rows[name]["job"] and row["job"] != rows[name]["job"]
    assert _embedding_rows(database_url) == stored  # no new row, none rewritten
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        theirs = job_embeddings(session, [r["job"] for r in again.values()])
        assert theirs.keys() == {r["job"] for r in again.values()}
        for name, row in again.items():
            np.testing.assert_array_equal(
                theirs[row["job"]], from_bytes(stored[rows[name]["job"]][3])
            )
        # Search over the new batch finds each image by its own embedding, as itself.
        batch = session.get(Job, again[files[3].name]["job"]).batch_id
        hits = nearest(session, _embedding_of(embedder, files[3]), model=str(tiny_clip),
                       revision=revision, batch=batch, limit=3)  # fmt: skip
        assert hits[0].job_id == again[files[3].name]["job"] and hits[0].input == str(files[3])
        assert hits[0].score == pytest.approx(1.0, abs=1e-5) and len(hits) == 3
    engine.dispose()

    # One file's bytes change: only that one is computed again.
    changed = files[4]
    _image(changed, 99, (61, 33))
    third = pixelmill(*night, env=env)
    assert third.returncode == 1, third.stderr
    assert "(1 new, 1 changed, 0 stale, 9 reused)" in third.stderr, third.stderr
    latest = {Path(r["input"]).name: r for r in _lines(third.stdout)}
    assert not latest[changed.name]["reused"] and latest[changed.name]["status"] == "done"
    assert sum(1 for r in latest.values() if r["reused"]) == 9
    now = _embedding_rows(database_url)
    assert set(now) - set(stored) == {latest[changed.name]["job"]}  # exactly one new row
    vector = from_bytes(now[latest[changed.name]["job"]][3])
    np.testing.assert_allclose(vector, _embedding_of(embedder, changed), atol=1e-5)
    assert not np.allclose(vector, from_bytes(stored[rows[changed.name]["job"]][3]), atol=1e-3)


# ---- zero-shot classify through a worker ----------------------------------------------------


def _client(env: dict[str, str]) -> Client:
    settings = load_settings(**{k[len("PIXELMILL_"):].lower(): v for k, v in env.items()
                                if k.startswith("PIXELMILL_")})  # fmt: skip
    return Client(settings)


def _has_labels_flag(env: dict[str, str]) -> bool:
    return "--labels" in pixelmill("run", "--help", env=env).stdout


def test_classify_with_labels_through_a_worker(tmp_path, redis_server, start_worker, tiny_clip):
    """Labels in the user's words, run by a real worker as a zero-shot classifier: the scores
    are the runner's (the pipeline's, tests/test_clip.py), softmax over exactly these labels."""
    files = _archive(tmp_path / "in", 4)
    labels = ["a red photo", "a blue photo"]
    env = pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_server.url,
                        database_url=f"sqlite:///{tmp_path / 'jobs.db'}")  # fmt: skip
    start_worker(env)
    with _client(env) as client:
        sub = client.submit("classify", [str(p) for p in files], model=str(tiny_clip),
                            options={"labels": labels})  # fmt: skip
        counts = client.wait(sub.batch_id, timeout=120)
        assert counts.by_status == {"done": len(files)}, counts.by_status
        results = {row.input: row.result for row in client.results(sub.batch_id)}
    expected = _zero_shot(tiny_clip, files, labels)
    for path in files:
        got = results[str(path)]
        assert got is not None and [x["label"] for x in got["labels"]] == \
            [x["label"] for x in expected[path]["labels"]]  # fmt: skip
        for ours, theirs in zip(got["labels"], expected[path]["labels"], strict=True):
            assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
        assert sum(x["score"] for x in got["labels"]) == pytest.approx(1.0, abs=1e-5)

    if _has_labels_flag(env):  # the CLI's --labels, once the producer has it
        done = pixelmill("run", "classify", *map(str, files), "--model", str(tiny_clip),
                         "--labels", ",".join(labels), "--json", "--no-local-workers",
                         "--timeout", "120", env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        for row in _lines(done.stdout):
            assert row["status"] == "done"
            assert {x["label"] for x in row["result"]["labels"]} == set(labels)
            assert row["result"] == expected[Path(row["input"])]


def _zero_shot(folder: Path, files: list[Path], labels: list[str]) -> dict[Path, Any]:
    from pixelmill.models.registry import ZERO_SHOT

    runner = create_runner(ZERO_SHOT, str(folder))
    runner.load("cpu")
    options = task_options("classify", {"labels": labels}, str(folder))
    out = runner.run([runner.prepare(str(p), {}, options) for p in files], options)
    return dict(zip(files, out, strict=True))


# ---- unfriendly cases -----------------------------------------------------------------------


def _slow_embedder(folder: Path, seconds: float) -> dict[str, str]:
    """Environment whose embed runner spends ``seconds`` preparing each item (a
    ``sitecustomize`` on PYTHONPATH): a batch lasts long enough to kill its worker mid-way."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import time\n"
        "import pixelmill.models.clip as clip\n"
        "_prepare = clip.ImageEmbedder.prepare\n"
        "def prepare(self, input, params, options):\n"
        f"    time.sleep({seconds!r})\n"
        "    return _prepare(self, input, params, options)\n"
        "clip.ImageEmbedder.prepare = prepare\n"
    )
    return {"PYTHONPATH": str(folder)}


def _sqlite(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def test_a_worker_killed_mid_embed_batch_leaves_one_embedding_per_job(
    tmp_path, redis_server, start_worker, tiny_clip, embedder
):
    files = _archive(tmp_path / "in", 16)
    db = tmp_path / "jobs.db"
    env = {**pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_server.url,
                           database_url=f"sqlite:///{db}", batch_size="4", **FAST),
           **_slow_embedder(tmp_path / "hook", 0.3)}  # fmt: skip
    with _client(env) as client:
        sub = client.submit("embed", [str(p) for p in files], model=str(tiny_clip))
        start_worker(env)

        def mid_batch() -> set[int]:
            """The holders of running jobs, once some embeddings are written already."""
            if not _sqlite(db, "SELECT count(*) FROM embeddings")[0][0]:
                return set()
            rows = _sqlite(db, "SELECT DISTINCT worker FROM jobs WHERE batch_id = ? AND "
                               "status = 'running'", sub.batch_id)  # fmt: skip
            return {int(w.rsplit("/", 1)[1]) for (w,) in rows if w and "/" in w}

        holder = _until(mid_batch, "no embed batch was ever seen running").pop()
        os.kill(holder, signal.SIGKILL)
        counts = client.wait(sub.batch_id, timeout=120)
    assert counts.by_status == {"done": len(files)}, counts.by_status
    jobs = dict(_sqlite(db, "SELECT input, id FROM jobs WHERE batch_id = ?", sub.batch_id))
    per_job = _sqlite(db, "SELECT job_id, count(*) FROM embeddings GROUP BY job_id")
    assert sorted(per_job) == sorted((job, 1) for job in jobs.values())
    assert _sqlite(db, "SELECT count(*), count(DISTINCT job_id) FROM results") == \
        [(len(files), len(files))]  # fmt: skip
    assert _sqlite(db, "SELECT count(*) FROM jobs WHERE attempts > 1")[0][0] >= 1  # ran again
    stored = _embedding_rows(f"sqlite:///{db}")
    for path in files:
        np.testing.assert_allclose(from_bytes(stored[jobs[str(path)]][3]),
                                   _embedding_of(embedder, path), atol=1e-5)  # fmt: skip


def test_a_redelivered_outcome_writes_one_embedding(sessions):
    """The same outcome written twice (a message redelivered after its worker wrote it): the
    job is already done, so the second write changes nothing, not even with other bytes."""
    first = np.linspace(-1, 1, 16, dtype=np.float32)
    first /= np.linalg.norm(first)
    with sessions.begin() as session:
        batch = create_batch(session, task="embed", model="m", inputs=["/x/a.png", "/x/b.png"])
    for attempt, vector in enumerate((first, first, first[::-1].copy())):
        with sessions.begin() as session:
            claim_jobs(session, batch.job_ids, worker=f"w{attempt}", device="cpu")
        with sessions.begin() as session:
            write_outcomes(session, [
                Outcome(job, result={"dim": 16}, model="m", model_revision="r1",
                        embedding=to_bytes(vector))
                for job in batch.job_ids
            ])  # fmt: skip
    with sessions() as session:
        rows = session.execute(select(Embedding.job_id, Embedding.vector)).all()
        assert sorted(r[0] for r in rows) == sorted(batch.job_ids)
        assert all(from_bytes(r[1]).tolist() == first.tolist() for r in rows)
        assert session.execute(text("SELECT count(*) FROM results")).scalar() == 2


def test_postgresql_without_pgvector_stores_blobs_and_says_so_once(postgres_server, caplog):
    url = postgres_server.create_database("no_pgvector")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if _pgvector_installable(conn):
                pytest.skip("this PostgreSQL has pgvector: the other path")
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        forget_vector_support()
        caplog.clear()  # the migration said it too, once per upgrade: not what is counted here
        with caplog.at_level(logging.WARNING, logger="pixelmill.db.embeddings"):
            with engine.connect() as conn:
                assert pgvector_enabled(conn) is False
            with engine.connect() as conn:
                assert pgvector_enabled(conn) is False
            with sessions.begin() as session:  # a write on the blob path says nothing more
                batch = create_batch(session, task="embed", model="m", inputs=["/x/a.png"])
                claim_jobs(session, batch.job_ids, worker="w", device="cpu")
                vector = np.full(8, 1 / np.sqrt(8), dtype=np.float32)
                outcome = Outcome(batch.job_ids[0], result={"dim": 8}, model="m",
                                  model_revision="r", embedding=to_bytes(vector))  # fmt: skip
                write_outcomes(session, [outcome])
        ours = [r for r in caplog.records if r.name == "pixelmill.db.embeddings"]
        warned = [r for r in ours if "not indexed" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert "pgvector" in warned[0].getMessage()
        with sessions() as session:
            (blob,) = session.execute(select(Embedding.vector)).scalars().all()
            assert from_bytes(blob).tolist() == vector.tolist()
            hits = nearest(session, vector, model="m", revision="r")  # the scan finds it
            assert [(h.job_id, round(h.score, 5)) for h in hits] == [(batch.job_ids[0], 1.0)]
    finally:
        forget_vector_support()
        engine.dispose()


def _pgvector_installable(conn: Any) -> bool:
    return bool(conn.execute(text(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
    )).scalar())  # fmt: skip


def test_postgresql_with_pgvector_fills_the_vector_column_and_its_index(postgres_server):
    """Where the server has pgvector (not on CI machines: no package for it there), the
    migration creates the extension and the column; writes fill it, the first write of a
    dimension makes its HNSW index, and the index answers as the scan does."""
    url = postgres_server.create_database("with_pgvector")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not _pgvector_installable(conn):
                pytest.skip("this PostgreSQL has no pgvector (CI machines): the blob path only")
        upgrade(engine)
        forget_vector_support()
        sessions = make_sessionmaker(engine)
        rng = np.random.default_rng(3)
        vectors = rng.standard_normal((40, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with sessions.begin() as session:
            batch = create_batch(session, task="embed", model="m",
                                 inputs=[f"/x/{i}.png" for i in range(40)])  # fmt: skip
            claim_jobs(session, batch.job_ids, worker="w", device="cpu")
            write_outcomes(session, [
                Outcome(job_id, result={"dim": 8}, model="m", model_revision="r",
                        embedding=to_bytes(v))
                for job_id, v in zip(batch.job_ids, vectors, strict=True)])  # fmt: skip
        with sessions() as session:
            assert pgvector_enabled(session.connection()) is True
            filled = session.execute(text("SELECT count(*) FROM embeddings WHERE vec IS NOT NULL"))
            assert filled.scalar() == 40
            indexes = session.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = "
                                           "'embeddings'")).scalars().all()  # fmt: skip
            assert "ix_embeddings_vec_8" in indexes
            query = rng.standard_normal(8).astype(np.float32)
            hits = nearest(session, query, model="m", revision="r", limit=5)
            expected = sorted(range(40), key=lambda i: -float(vectors[i] @ query))[:5]
            assert [h.input for h in hits] == [f"/x/{i}.png" for i in expected]
            q = query / np.linalg.norm(query)
            for h, i in zip(hits, expected, strict=True):
                assert h.score == pytest.approx(float(vectors[i] @ q), abs=1e-5)
    finally:
        forget_vector_support()
        engine.dispose()
