"""`pixelmill export`: a batch, or the latest result per input under a folder, as JSON lines,
CSV and Parquet, read back exactly; on SQLite and PostgreSQL, through the real db functions and
the real CLI; and a large export in bounded memory."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import insert, select, update

from pixelmill.db.engine import make_engine, make_sessionmaker
from pixelmill.db.jobs import claim_jobs, create_batch, write_outcomes
from pixelmill.db.migrate import upgrade
from pixelmill.db.reads import _code_point_order, iter_latest_jobs
from pixelmill.db.records import ArtifactRecord, Outcome
from pixelmill.db.schema import Batch, Job, JobStatus, Result
from pixelmill.errors import InputError
from pixelmill.producer.export import (
    Column,
    batch_export,
    columns_for,
    format_for,
    latest_export,
    latest_prefix,
    run_export,
    write_export,
)
from tests.conftest import MANY_PROCESSES, PHOTOS, pixelmill, pixelmill_env

NIGHT1 = datetime(2024, 5, 1, 2, 0, 0, 123456, tzinfo=UTC)
NIGHT2 = datetime(2024, 5, 2, 2, 0, 0, 654321, tzinfo=UTC)
CAT = {"labels": [{"label": "tabby", "score": 0.9}, {"label": "tiger cat", "score": 0.05}]}
DOG = {"labels": [{"label": "beagle", "score": 0.7}]}
BASE = ["input", "sha256", "task", "model", "revision", "status", "error", "reused",
        "reused_from", "finished", "attempts", "device", "batch", "job"]  # fmt: skip


def night(
    sessions,
    task: str,
    outcomes: dict[str, Any],
    *,
    model: str = "m",
    reused: dict[str, str] | None = None,
    finished: datetime | None = None,
    revision: str = "rev1",
    device: str = "cuda:0",
) -> tuple[str, dict[str, str]]:
    """A batch over the inputs of ``outcomes`` and ``reused`` (input -> earlier job id). Each
    of the others is claimed and finished with its outcome: a result dict, an error string, or
    (result, artifact). All its jobs finished at ``finished`` if given. Returns the batch id
    and the job id of each input."""
    reused = reused or {}
    inputs = [*outcomes, *reused]
    by_index = {inputs.index(name): job for name, job in reused.items()}
    with sessions.begin() as s:
        new = create_batch(
            s,
            task=task,
            model=model,
            inputs=inputs,
            contents=[sha(name) for name in inputs],
            reused=by_index,
        )
    ids = dict(zip(outcomes, new.job_ids, strict=True))
    done = []
    for name, what in outcomes.items():
        artifacts: tuple[ArtifactRecord, ...] = ()
        if isinstance(what, tuple):
            what, artifact = what
            artifacts = (artifact,)
        if isinstance(what, str):
            done.append(Outcome(job_id=ids[name], error=what, model=model, device=device))
        else:
            done.append(Outcome(job_id=ids[name], result=what, model=model, device=device,
                                model_revision=revision, artifacts=artifacts))  # fmt: skip
    with sessions.begin() as s:
        claim_jobs(s, new.job_ids, worker="w", device=device)
        write_outcomes(s, done)
        if finished is not None:
            s.execute(update(Job).where(Job.batch_id == new.batch_id).values(finished_at=finished))
    with sessions() as s:
        ids = dict(s.execute(select(Job.input, Job.id).where(Job.batch_id == new.batch_id)).all())
    return new.batch_id, ids


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def read_back(path: Path, fmt: str) -> list[dict[str, Any]]:
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if fmt == "csv":
        return list(csv.DictReader(text.splitlines(keepends=True)))
    return [json.loads(line) for line in text.splitlines()]


def two_batches(sessions) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """Night 1: a cat (classified), a broken file (failed). Night 2: the cat again (reused:
    the same bytes) and a dog (classified)."""
    b1, ids1 = night(sessions, "classify", {"/p/cat.jpg": CAT, "/p/bad.jpg": "/p/bad.jpg: broken"},
                     finished=NIGHT1, device="cuda:1")  # fmt: skip
    b2, ids2 = night(sessions, "classify", {"/p/dog.jpg": DOG},
                     reused={"/p/cat.jpg": ids1["/p/cat.jpg"]}, finished=NIGHT2)  # fmt: skip
    return b1, b2, ids1, ids2


# ---- a batch, each format ------------------------------------------------------------------


def test_a_batch_as_parquet_is_typed_and_flattened(sessions, tmp_path):
    b1, b2, ids1, ids2 = two_batches(sessions)
    out = tmp_path / "b.parquet"
    tally = run_export(sessions, batch_export(sessions, b2), "parquet", str(out), labels=3)
    assert tally.rows == 2
    table = pq.read_table(out)
    types = dict(zip(table.schema.names, table.schema.types, strict=True))
    assert table.schema.names == [*BASE, "label_1", "score_1", "label_2", "score_2", "label_3",
                                  "score_3", "result_json"]  # fmt: skip
    assert types["score_1"] == pa.float64() and types["label_1"] == pa.string()
    assert types["reused"] == pa.bool_() and types["attempts"] == pa.int64()
    assert types["finished"] == pa.timestamp("us", tz="UTC")
    dog, cat = table.to_pylist()
    assert dog == {
        "input": "/p/dog.jpg", "sha256": sha("/p/dog.jpg"), "task": "classify", "model": "m",
        "revision": "rev1", "status": "done", "error": None, "reused": False,
        "reused_from": None, "finished": NIGHT2, "attempts": 1, "device": "cuda:0",
        "batch": b2, "job": ids2["/p/dog.jpg"], "label_1": "beagle", "score_1": 0.7,
        "label_2": None, "score_2": None, "label_3": None, "score_3": None,
        "result_json": '{"labels":[{"label":"beagle","score":0.7}]}',
    }  # fmt: skip
    # The reused job: the earlier job's result, revision and device; its own ids and time.
    assert cat["reused"] is True and cat["reused_from"] == ids1["/p/cat.jpg"]
    assert cat["job"] == ids2["/p/cat.jpg"] != ids1["/p/cat.jpg"] and cat["batch"] == b2
    assert (cat["label_1"], cat["score_1"], cat["label_2"], cat["score_2"]) == (
        "tabby", 0.9, "tiger cat", 0.05)  # fmt: skip
    assert cat["label_3"] is None and json.loads(cat["result_json"]) == CAT
    assert (cat["revision"], cat["device"], cat["attempts"]) == ("rev1", "cuda:1", 0)
    assert cat["finished"] == NIGHT2 and cat["finished"].utcoffset() == timedelta(0)
    assert cat["sha256"] == sha("/p/cat.jpg")
    meta = pq.read_schema(out).metadata
    assert meta[b"pixelmill.export"] == f"batch {b2}".encode()


def test_a_failed_job_as_csv_and_jsonl(sessions, tmp_path):
    b1, _b2, ids1, _ids2 = two_batches(sessions)
    out = tmp_path / "b.csv"
    run_export(sessions, batch_export(sessions, b1), "csv", str(out))
    text = out.read_text(encoding="utf-8")
    assert text.splitlines()[0] == ",".join(
        [*BASE, *(f"{x}_{i}" for i in range(1, 6) for x in ("label", "score")), "result_json"]
    )
    cat, bad = read_back(out, "csv")
    assert cat["input"] == "/p/cat.jpg" and cat["reused"] == "false"
    assert (cat["label_1"], cat["score_1"], cat["label_2"], cat["score_2"]) == (
        "tabby", "0.9", "tiger cat", "0.05")  # fmt: skip
    assert cat["label_3"] == cat["score_3"] == cat["error"] == ""
    assert cat["finished"] == "2024-05-01T02:00:00.123456+00:00"
    assert datetime.fromisoformat(cat["finished"]) == NIGHT1
    assert json.loads(cat["result_json"]) == CAT
    assert bad == {**{k: "" for k in bad}, "input": "/p/bad.jpg", "sha256": sha("/p/bad.jpg"),
                   "task": "classify", "model": "m", "status": "failed",
                   "error": "/p/bad.jpg: broken", "reused": "false", "attempts": "1",
                   "finished": NIGHT1.isoformat(), "device": "cuda:1", "batch": b1,
                   "job": ids1["/p/bad.jpg"]}  # fmt: skip

    out = tmp_path / "b.jsonl"
    run_export(sessions, batch_export(sessions, b1), "jsonl", str(out))
    cat, bad = read_back(out, "jsonl")
    assert cat["result"] == CAT and cat["reused"] is False and cat["revision"] == "rev1"
    assert cat["finished"] == NIGHT1.isoformat() and cat["sha256"] == sha("/p/cat.jpg")
    assert bad["result"] is None and bad["error"] == "/p/bad.jpg: broken"
    assert bad["status"] == "failed" and bad["job"] == ids1["/p/bad.jpg"] and bad["batch"] == b1
    assert set(cat) == {*BASE, "result", "artifact", "artifact_sha256"}


def test_a_reused_job_in_jsonl_shows_the_earlier_result(sessions, tmp_path):
    _b1, b2, ids1, _ids2 = two_batches(sessions)
    out = tmp_path / "b.jsonl"
    run_export(sessions, batch_export(sessions, b2), "jsonl", str(out))
    _dog, cat = read_back(out, "jsonl")
    assert cat["reused"] is True and cat["reused_from"] == ids1["/p/cat.jpg"]
    assert cat["result"] == CAT and cat["status"] == "done"


def test_caption_and_generate_columns(sessions, tmp_path):
    cap, cap_ids = night(sessions, "caption", {"/p/a.jpg": {"caption": "a cat, on a mat"},
                                               "/p/b.jpg": "/p/b.jpg: truncated"})  # fmt: skip
    art = ArtifactRecord(key="k/0.png", uri="file:///store/k/0.png", content_type="image/png",
                         size=10, sha256="ab" * 32, width=64, height=64, seed=7)  # fmt: skip
    gen, _ = night(sessions, "generate", {"a lighthouse": ({"seed": 7}, art)})
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"cap.{fmt}"
        run_export(sessions, batch_export(sessions, cap), fmt, str(out))
        rows = read_back(out, fmt)
        assert list(rows[0]) == [*BASE, "caption", "result_json"]
        assert rows[0]["caption"] == "a cat, on a mat"
        assert rows[1]["caption"] in ("", None) and rows[1]["status"] == "failed"
        out = tmp_path / f"gen.{fmt}"
        run_export(sessions, batch_export(sessions, gen), fmt, str(out))
        (row,) = read_back(out, fmt)
        assert list(row) == [*BASE, "artifact", "artifact_sha256", "result_json"]
        assert (row["artifact"], row["artifact_sha256"]) == ("file:///store/k/0.png", "ab" * 32)
        assert json.loads(row["result_json"]) == {"seed": 7}
    run_export(sessions, batch_export(sessions, gen), "jsonl", str(tmp_path / "gen.jsonl"))
    (row,) = read_back(tmp_path / "gen.jsonl", "jsonl")
    assert row["artifact"] == "file:///store/k/0.png" and row["result"] == {"seed": 7}


def test_an_empty_export_still_has_its_columns(sessions, tmp_path):
    out = tmp_path / "none.parquet"
    assert run_export(sessions, latest_export("/nothing/"), "parquet", str(out)).rows == 0
    table = pq.read_table(out)
    assert table.num_rows == 0
    assert "label_5" in table.schema.names and "caption" in table.schema.names
    assert "artifact" in table.schema.names
    out = tmp_path / "none.csv"
    run_export(sessions, latest_export("/nothing/", task="caption"), "csv", str(out))
    assert out.read_text() == ",".join([*BASE, "caption", "result_json"]) + "\n"


def test_latest_keeps_the_newest_result_per_input_under_the_folder(sessions, tmp_path):
    odd = "/arch/a/50%_off.jpg"  # LIKE's wildcards, only characters here
    _b1, ids1 = night(sessions, "classify", {
        "/arch/a/1.jpg": CAT, "/arch/a/2.jpg": DOG, "/arch/a/sub/3.jpg": CAT, odd: DOG,
        "/arch/ab.jpg": CAT, "/arch/a0.jpg": CAT, "/arch/a": CAT, "/arch/A/1.jpg": CAT,
    }, finished=NIGHT1)  # fmt: skip
    changed = {"labels": [{"label": "lynx", "score": 0.6}]}
    b2, ids2 = night(sessions, "classify",
                     {"/arch/a/1.jpg": changed, "/arch/a/sub/3.jpg": "/arch/a/sub/3.jpg: gone"},
                     reused={"/arch/a/2.jpg": ids1["/arch/a/2.jpg"]}, finished=NIGHT2)  # fmt: skip
    # Other tasks and models over the same folder are other groups.
    cap, cap_ids = night(sessions, "caption", {"/arch/a/1.jpg": {"caption": "a lynx"}},
                         finished=NIGHT1)  # fmt: skip
    other, other_ids = night(sessions, "classify", {"/arch/a/1.jpg": DOG}, model="m2",
                             finished=NIGHT2 + timedelta(days=1))  # fmt: skip

    out = tmp_path / "latest.parquet"
    export = latest_export(latest_prefix("/arch/a"), task="classify", model="m")
    assert run_export(sessions, export, "parquet", str(out)).rows == 4
    rows = pq.read_table(out).to_pylist()
    assert [r["input"] for r in rows] == ["/arch/a/1.jpg", "/arch/a/2.jpg", odd,
                                          "/arch/a/sub/3.jpg"]  # fmt: skip
    one, two, three_odd, sub = rows
    assert (one["job"], one["batch"], one["label_1"], one["score_1"]) == (
        ids2["/arch/a/1.jpg"], b2, "lynx", 0.6)  # fmt: skip
    assert one["finished"] == NIGHT2 and one["reused"] is False
    assert two["reused"] is True and two["reused_from"] == ids1["/arch/a/2.jpg"]
    assert (two["job"], two["label_1"], two["finished"]) == (ids2["/arch/a/2.jpg"], "beagle",
                                                             NIGHT2)  # fmt: skip
    assert three_odd["job"] == ids1[odd] and three_odd["finished"] == NIGHT1
    # The newest is the current state, also when it failed.
    assert sub["status"] == "failed" and sub["error"] == "/arch/a/sub/3.jpg: gone"
    assert sub["label_1"] is None and sub["result_json"] is None
    assert list(rows[0]).count("caption") == 0  # --task classify: its columns only

    # Without --task and --model: every task's and model's latest, with every column.
    out = tmp_path / "all.csv"
    run_export(sessions, latest_export(latest_prefix("/arch/a/")), "csv", str(out))
    rows = read_back(out, "csv")
    assert [(r["input"], r["task"], r["model"]) for r in rows] == [
        ("/arch/a/1.jpg", "caption", "m"),
        ("/arch/a/1.jpg", "classify", "m"),
        ("/arch/a/1.jpg", "classify", "m2"),
        ("/arch/a/2.jpg", "classify", "m"),
        (odd, "classify", "m"),
        ("/arch/a/sub/3.jpg", "classify", "m"),
    ]
    assert rows[0]["caption"] == "a lynx" and rows[0]["label_1"] == ""
    assert rows[0]["job"] == cap_ids["/arch/a/1.jpg"] and rows[0]["artifact"] == ""
    assert rows[1]["label_1"] == "lynx" and rows[1]["caption"] == ""
    assert rows[2]["job"] == other_ids["/arch/a/1.jpg"] and rows[2]["label_1"] == "beagle"


def test_latest_on_ties_takes_the_job_created_last(sessions):
    _b1, ids1 = night(sessions, "classify", {"/t/x.jpg": CAT}, finished=NIGHT1)
    _b2, ids2 = night(sessions, "classify", {"/t/x.jpg": DOG}, finished=NIGHT1)
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == ids1["/t/x.jpg"])
                  .values(created_at=NIGHT1 - timedelta(hours=1)))  # fmt: skip
    with sessions() as s:
        (row,) = iter_latest_jobs(s, "/t/")
    assert row.job == ids2["/t/x.jpg"] and row.result == DOG


def test_latest_over_an_object_store_prefix(sessions):
    night(sessions, "caption", {"s3://bkt/2024/x.jpg": {"caption": "x"},
                                "s3://bkt/2024x.jpg": {"caption": "no"},
                                "s3://bkt/2023/y.jpg": {"caption": "no"}})  # fmt: skip
    with sessions() as s:
        rows = list(iter_latest_jobs(s, latest_prefix("s3://bkt/2024"), page=1))
    assert [(r.input, r.result) for r in rows] == [("s3://bkt/2024/x.jpg", {"caption": "x"})]


def test_latest_is_exact_in_an_icu_collated_postgresql(postgres_server, tmp_path):
    """In an ICU (en-US) database, "/p/B/y.jpg" sorts inside the range of "/p/b/": the prefix
    is compared in code point order there all the same."""
    import psycopg

    name = "t_icu_" + uuid.uuid4().hex[:8]
    try:
        with psycopg.connect(
            f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
                         "ICU_LOCALE 'en-US'")  # fmt: skip
    except psycopg.Error as exc:
        pytest.skip(f"no ICU collation in this PostgreSQL ({exc})")
    engine = make_engine(postgres_server.url(name))
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    try:
        inputs = {"/p/b/x.jpg": CAT, "/p/B/y.jpg": DOG, "/p/b-c/z.jpg": DOG, "/p/bz.jpg": DOG}
        night(sessions, "classify", inputs)
        with sessions() as s:
            assert not _code_point_order(s)
            assert [r.input for r in iter_latest_jobs(s, "/p/b/")] == ["/p/b/x.jpg"]
    finally:
        engine.dispose()


def test_code_point_order_is_known_for_the_test_databases(sessions):
    with sessions() as s:
        assert _code_point_order(s)  # SQLite; PostgreSQL initdb'd in C.UTF-8


def test_latest_prefix():
    assert latest_prefix("/a/b") == latest_prefix("/a/b/") == "/a/b/"
    assert latest_prefix("/") == "/"
    assert latest_prefix("rel/dir") == os.path.abspath("rel/dir") + "/"
    assert latest_prefix("/a/./b/../c") == "/a/c/"
    assert latest_prefix("s3://bkt/p") == latest_prefix("s3://bkt/p/") == "s3://bkt/p/"
    with pytest.raises(InputError, match="names no bucket"):
        latest_prefix("s3://")  # not every bucket at once


# ---- the file: format, atomic replacement, errors ------------------------------------------


def test_the_format_comes_from_the_extension_or_is_a_usage_error():
    assert format_for("x.parquet", None) == "parquet"
    assert format_for("X.CSV", None) == "csv"
    assert format_for("x.jsonl", None) == format_for("x.ndjson", None) == "jsonl"
    assert format_for("x.txt", "csv") == "csv"
    with pytest.raises(InputError, match=r"x\.txt.*--format jsonl\|csv\|parquet"):
        format_for("x.txt", None)
    with pytest.raises(InputError, match="standard output"):
        format_for("-", None)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_failed_export_leaves_the_old_file_and_no_partial_one(sessions, tmp_path, fmt):
    _b1, b2, _ids1, _ids2 = two_batches(sessions)
    out = tmp_path / f"out.{fmt}"
    out.write_text("the previous export\n")
    columns = columns_for(["classify"])

    class Interrupted(BaseException):
        pass

    def jobs():
        with sessions() as s:
            yield from batch_export(sessions, b2).jobs(s)
        raise Interrupted  # as Ctrl-C or SIGTERM would, after some rows were written

    with pytest.raises(Interrupted):
        write_export(jobs(), fmt, str(out), columns)
    assert out.read_text() == "the previous export\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))] == [
        f"out.{fmt}"
    ]
    # And a complete one replaces it, with the usual permissions (not mkstemp's 0600).
    run_export(sessions, batch_export(sessions, b2), fmt, str(out))
    assert len(read_back(out, fmt)) == 2
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_column_list_picks_the_flattened_values():
    assert [c.name for c in columns_for(["classify"], labels=1)][-3:] == [
        "label_1", "score_1", "result_json"]  # fmt: skip
    assert Column("score_1", "float") in columns_for(["classify"], labels=1)
    with pytest.raises(InputError, match="unknown task"):
        columns_for(["paint"])


# ---- the command ---------------------------------------------------------------------------


def test_the_command_reports_usage_errors_naming_the_file(sessions, database_url, tmp_path):
    _b1, b2, _ids1, _ids2 = two_batches(sessions)
    env = pixelmill_env(database_url=database_url)

    done = pixelmill("export", b2, "-o", str(tmp_path / "x.txt"), env=env)
    assert done.returncode == 2 and "--format jsonl|csv|parquet" in done.stderr
    missing = tmp_path / "no" / "such" / "b.csv"
    done = pixelmill("export", b2, "-o", str(missing), env=env)
    assert done.returncode == 2 and str(missing) in done.stderr and "does not exist" in done.stderr
    done = pixelmill("export", b2, "-o", "-", "--format", "parquet", env=env)
    assert done.returncode == 2 and "parquet needs a file" in done.stderr
    done = pixelmill("export", "no-such-batch", "-o", str(tmp_path / "b.csv"), env=env)
    assert done.returncode == 2 and "no batch with id 'no-such-batch'" in done.stderr
    assert not (tmp_path / "b.csv").exists()
    done = pixelmill("export", b2, "--latest", "/p", "-o", str(tmp_path / "b.csv"), env=env)
    assert done.returncode == 2 and "either BATCH or --latest" in done.stderr
    done = pixelmill("export", b2, "--task", "caption", "-o", str(tmp_path / "b.csv"), env=env)
    assert done.returncode == 2 and "--latest" in done.stderr

    done = pixelmill("export", b2, "-o", "-", "--format", "csv", "--labels", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "2 rows written to standard output (csv)"
    rows = list(csv.DictReader(done.stdout.splitlines(keepends=True)))
    assert [(r["input"], r["label_1"], r["reused"]) for r in rows] == [
        ("/p/dog.jpg", "beagle", "false"), ("/p/cat.jpg", "tabby", "true")]  # fmt: skip
    assert "label_2" not in rows[0]
    private = tmp_path / "private.csv"
    private.write_text("old\n")
    private.chmod(0o600)
    done = pixelmill("export", b2, "-o", str(private), env=env)
    assert done.returncode == 0 and (private.stat().st_mode & 0o777) == 0o600  # mode kept


def test_end_to_end_run_then_export(photos, tmp_path):
    """`pixelmill run` twice over the same photos (the second run reuses every result), then
    the batch as Parquet and the latest per photo as CSV, through the real CLI."""
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    first = pixelmill("run", "classify", str(photos), "--model", "null", env=env)
    assert first.returncode == 0, first.stderr
    batch1 = re.search(r"batch (\S+):", first.stderr)[1]
    again = pixelmill("run", "classify", str(photos), "--model", "null", "--again", env=env)
    assert again.returncode == 0, again.stderr
    batch2 = re.search(r"batch (\S+):", again.stderr)[1]
    assert batch2 != batch1

    out = tmp_path / "out.parquet"
    done = pixelmill("export", batch1, "-o", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"4 rows written to {out} (parquet)"
    rows = pq.read_table(out).to_pylist()
    names = sorted(os.path.abspath(photos / name) for name in PHOTOS)
    assert sorted(r["input"] for r in rows) == names
    for r in rows:
        assert r["sha256"] == hashlib.sha256(Path(r["input"]).read_bytes()).hexdigest()
        assert (r["task"], r["model"], r["revision"], r["status"]) == (
            "classify", "null", "none", "done")  # fmt: skip
        assert r["reused"] is False and r["batch"] == batch1 and r["result_json"] == "{}"
        assert r["label_1"] is None and r["finished"].utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - r["finished"]) < timedelta(minutes=10)

    out = tmp_path / "latest.csv"
    # A relative SOURCE is made absolute, as the inputs were when submitted.
    done = subprocess.run(
        [sys.executable, "-m", "pixelmill", "export", "--latest", "photos", "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=120, cwd=photos.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    latest = read_back(out, "csv")
    assert [r["input"] for r in latest] == names
    by_input = {r["input"]: r for r in rows}
    for r in latest:
        assert r["batch"] == batch2 and r["reused"] == "true"
        assert r["reused_from"] == by_input[r["input"]]["job"]
        assert r["result_json"] == "{}" and r["status"] == "done"


# ---- memory ---------------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import json, sys
    import pyarrow, pyarrow.parquet, sqlalchemy
    from pixelmill.cli import cli

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    baseline = status("VmHWM")
    try:
        cli.main(sys.argv[1:], prog_name="pixelmill", standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, exc.code
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
    """
)


def fill(url: str, sizes: dict[str, int]) -> dict[str, str]:
    """A batch of ``n`` done classify jobs under /``name``/ for each of ``sizes``, inserted in
    bulk; returns the batch id of each."""
    engine = make_engine(url)
    upgrade(engine)
    now = datetime.now(UTC)
    result = {"labels": [{"label": f"class number {i}", "score": 0.1 * i} for i in range(5)]}
    batches = {}
    with engine.begin() as conn:
        for name, n in sizes.items():
            batch_id = batches[name] = str(uuid.uuid4())
            batch = {"id": batch_id, "task": "classify", "model": "m", "total": n,
                     "options": {}, "created_at": now}  # fmt: skip
            conn.execute(insert(Batch), [batch])
            for start in range(0, n, 20_000):
                ids = [str(uuid.uuid4()) for _ in range(start, min(n, start + 20_000))]
                conn.execute(insert(Job), [
                    {"id": job_id, "batch_id": batch_id, "seq": start + i,
                     "input": f"/{name}/{start + i:07d}.jpg", "status": JobStatus.done,
                     "attempts": 1, "device": "cpu", "created_at": now, "finished_at": now,
                     "content_sha256": hashlib.sha256(job_id.encode()).hexdigest()}
                    for i, job_id in enumerate(ids)
                ])  # fmt: skip
                conn.execute(insert(Result), [
                    {"job_id": job_id, "data": result, "model": "m", "model_revision": "r",
                     "device": "cpu", "created_at": now}
                    for job_id in ids
                ])  # fmt: skip
    engine.dispose()
    return batches


@pytest.mark.slow
@MANY_PROCESSES
def test_a_large_export_runs_in_bounded_memory(tmp_path):
    url = f"sqlite:///{tmp_path / 'big.db'}"
    started = time.monotonic()
    batches = fill(url, {"big": 200_000, "small": 20_000})
    filled = time.monotonic() - started
    env = pixelmill_env(database_url=url)

    def measure(*args: str) -> dict[str, int]:
        done = subprocess.run([sys.executable, "-c", MEASURE, "export", *args], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    figures = {}
    for mode in ("batch", "latest"):
        for name, n in (("small", 20_000), ("big", 200_000)):
            out = tmp_path / f"{mode}-{name}.parquet"
            what = [batches[name]] if mode == "batch" else ["--latest", f"/{name}"]
            t0 = time.monotonic()
            figures[mode, name] = measure(*what, "-o", str(out))
            figures[mode, name]["seconds"] = time.monotonic() - t0
            meta = pq.ParquetFile(out).metadata
            assert meta.num_rows == n
            assert meta.num_row_groups == n // 10_000
        small, big = figures[mode, "small"], figures[mode, "big"]
        grow_small = small["peak"] - small["baseline"]
        grow_big = big["peak"] - big["baseline"]
        mib = 1 << 20
        print(
            f"\n{mode}: baseline {big['baseline'] / mib:.0f} MiB; peak above it: 20k rows "
            f"{grow_small / mib:.1f} MiB ({small['seconds']:.1f}s), 200k rows "
            f"{grow_big / mib:.1f} MiB ({big['seconds']:.1f}s); db filled in {filled:.1f}s"
        )
        assert grow_big < 3 * grow_small + 50 * mib, figures
