"""Incremental by content: only new or changed images cost work; every other one takes the
earlier result, marked reused, pointing at the job that computed it. Real `pixelmill run` and
`submit` processes, real workers, SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pixelmill.db.engine import make_engine, make_sessionmaker
from pixelmill.db.jobs import claim_jobs, create_batch, write_outcomes
from pixelmill.db.migrate import upgrade
from pixelmill.db.records import Outcome
from pixelmill.producer.client import Client
from pixelmill.producer.reuse import RACY_SECONDS, identify, remember
from pixelmill.settings import Settings
from tests.conftest import ROOT, pixelmill, pixelmill_env
from tests.tiny_models import build_tiny_vit_classifier


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)
    old = time.time() - 10 * RACY_SECONDS  # older than the racy window: remembered
    os.utime(path, (old, old))
    return path


def _archive(folder: Path, n: int) -> list[Path]:
    return [_image(folder / f"img{i:02d}.jpg", (i * 23 % 256, 40, 200 - i)) for i in range(n)]


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = pixelmill("run", *args, env=env)
    assert done.returncode == 0, done.stderr
    return done


def test_a_nightly_archive_processes_only_new_and_changed_images(tmp_path):
    archive = tmp_path / "archive"
    files = _archive(archive, 6)
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    night = ("classify", str(archive), "--model", "null", "--json")

    first = _lines(_run(env, *night).stdout)
    assert len(first) == 6 and not any(r["reused"] for r in first)
    computed = {r["sha256"]: r["job"] for r in first}
    assert len(computed) == 6 and all(r["revision"] == "none" for r in first)

    # The archive moves on: one file renamed, one copied, one edited in place, one added.
    files[0].rename(archive / "renamed.jpg")
    shutil.copy2(files[1], archive / "copy-of-1.jpg")
    _image(files[2], (1, 2, 3))
    _image(archive / "zz-new.jpg", (9, 9, 9))

    plan = pixelmill("run", *night, "--plan", env=env)
    assert plan.returncode == 0, plan.stderr
    actions = {Path(r["input"]).name: r["action"] for r in _lines(plan.stdout)}
    assert actions == {
        "renamed.jpg": "reused", "copy-of-1.jpg": "reused", "img01.jpg": "reused",
        "img02.jpg": "changed", "img03.jpg": "reused", "img04.jpg": "reused",
        "img05.jpg": "reused", "zz-new.jpg": "new",
    }  # fmt: skip
    text = pixelmill("run", *night[:-1], "--plan", env=env)
    assert "8: 1 new, 1 changed, 0 stale, 6 reused" in text.stdout, text.stdout
    db = sqlite3.connect(tmp_path / "data" / "pixelmill.db")
    assert db.execute("SELECT count(*) FROM batches").fetchone() == (1,)  # a plan registers none

    second = _run(env, *night)
    rows = {Path(r["input"]).name: r for r in _lines(second.stdout)}
    assert "8 jobs (1 new, 1 changed, 0 stale, 6 reused)" in second.stderr
    for name in ("renamed.jpg", "copy-of-1.jpg", "img01.jpg", "img03.jpg"):
        row = rows[name]
        assert row["status"] == "done" and row["reused"]
        assert row["reused_from"] == computed[row["sha256"]]  # the job that computed it
    assert not rows["img02.jpg"]["reused"] and rows["img02.jpg"]["sha256"] not in computed
    assert not rows["zz-new.jpg"]["reused"]
    # Only the two new contents reached a worker: two more results, both of this batch.
    batch = rows["zz-new.jpg"]["job"]
    assert db.execute("SELECT count(*) FROM results").fetchone() == (8,)
    assert db.execute(
        "SELECT count(*) FROM jobs WHERE reused_from IS NULL AND batch_id = "
        "(SELECT batch_id FROM jobs WHERE id = ?)", (batch,)
    ).fetchone() == (2,)  # fmt: skip

    batch_id = db.execute("SELECT batch_id FROM jobs WHERE id = ?", (batch,)).fetchone()[0]
    status = pixelmill("status", batch_id, "--json", env=env)
    counts = json.loads(status.stdout)
    assert (counts["done"], counts["reused"]) == (8, 6)
    assert counts["plan"] == {"new": 1, "changed": 1, "stale": 0, "reused": 6}
    results = pixelmill("results", batch_id, env=env)
    assert results.stdout.count("(reused)") == 6

    forced = _run(env, *night, "--force")
    assert not any(r["reused"] for r in _lines(forced.stdout))
    assert "0 reused, 8 forced" in forced.stderr
    db.close()


def test_other_options_make_earlier_results_stale(tmp_path):
    archive = tmp_path / "archive"
    _archive(archive, 3)
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    base = ("caption", str(archive), "--model", "null", "--json")
    _run(env, *base, "--max-new-tokens", "5")
    plan = pixelmill("run", *base, "--max-new-tokens", "6", "--plan", env=env)
    assert {r["action"] for r in _lines(plan.stdout)} == {"stale"}
    again = _run(env, *base, "--max-new-tokens", "6")
    assert not any(r["reused"] for r in _lines(again.stdout))
    back = _run(env, *base, "--max-new-tokens", "5")  # the first options' batch again
    assert "made before" in back.stderr
    anew = _run(env, *base, "--max-new-tokens", "5", "--again")  # a new batch: all reused
    assert all(r["reused"] for r in _lines(anew.stdout))


def test_a_new_model_revision_makes_earlier_results_stale(tmp_path):
    archive = tmp_path / "archive"
    _archive(archive, 3)
    model = build_tiny_vit_classifier(tmp_path / "model")
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    night = ("classify", str(archive), "--model", str(model), "--json")
    first = _lines(_run(env, *night).stdout)
    assert all(r["revision"].startswith("local-") for r in first)
    assert all(r["reused"] for r in _lines(_run(env, *night, "--again").stdout))

    # The model is retrained in place: same files, other weights.
    import torch
    from transformers import ViTForImageClassification

    net = ViTForImageClassification.from_pretrained(model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    net.save_pretrained(model)
    plan = pixelmill("run", *night, "--plan", env=env)
    assert {r["action"] for r in _lines(plan.stdout)} == {"stale"}, plan.stdout
    after = _lines(_run(env, *night).stdout)
    assert not any(r["reused"] for r in after)
    assert {r["revision"] for r in after}.isdisjoint({r["revision"] for r in first})


def test_the_stat_fast_path_reads_only_what_changed(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    files = _archive(tmp_path / "a", 5)
    with Client(settings) as client:
        names = [str(p) for p in files]
        first = identify(client.sessions, names)
        assert first.hashed == 5 and all(first.sha256)
        remember(client.sessions, first)
        assert identify(client.sessions, names).hashed == 0  # nothing read again

        _image(files[0], (250, 0, 0))  # changed: new size or mtime, read again
        files[1].write_bytes(files[1].read_bytes())  # rewritten just now: racy
        (tmp_path / "a" / "fifo").unlink(missing_ok=True)
        os.mkfifo(tmp_path / "a" / "fifo")
        third = identify(client.sessions, [*names, str(tmp_path / "a" / "fifo"), "/no/such"])
        assert third.hashed == 2 and third.sha256[2:5] == first.sha256[2:5]
        assert third.previous == {0: first.sha256[0]}  # the same bytes as before for files[1]
        assert third.sha256[5:] == [None, None]  # a FIFO is never opened; a missing file
        remember(client.sessions, third)
        # The racy file was not remembered: read again next time, until it is old enough.
        assert identify(client.sessions, names).hashed == 1


def test_the_index_on_postgresql_under_concurrent_writers(postgres_server):
    url = postgres_server.create_database("content_index")
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        batches = [
            create_batch(session, task="classify", model="m", inputs=["/x/a.jpg", "/x/b.jpg"],
                         contents=["a" * 64, "b" * 64], recipe="r" * 64)
            for _ in range(2)
        ]  # fmt: skip
    errors: list[BaseException] = []

    def work(job_ids: list[str], worker: str) -> None:
        try:
            with sessions.begin() as session:
                claim_jobs(session, job_ids, worker=worker, device="cpu")
            with sessions.begin() as session:
                outcomes = [Outcome(j, result={}, model="m", model_revision="r1") for j in job_ids]
                write_outcomes(session, outcomes)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(b.job_ids, f"w{i}")) for i, b in enumerate(batches)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT content_sha256, count(*) FROM content_results GROUP BY content_sha256"
        ).all()
    assert sorted(rows) == [("a" * 64, 1), ("b" * 64, 1)]  # one entry per content, kept first
    engine.dispose()


def test_overlapping_runs_over_one_source_do_the_work_once(tmp_path, redis_server):
    """A cron `submit` whose workers are not up yet, then a `run` over the same folder: the run
    finds the submitted batch, says so and waits for it (its own workers do that work), then
    submits what is left; a second `submit` meanwhile returns the same batch."""
    archive = tmp_path / "archive"
    _archive(archive, 5)
    env = pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_server.url,
                        database_url=f"sqlite:///{tmp_path / 'jobs.db'}")  # fmt: skip
    args = ("classify", str(archive), "--model", "null", "--json")
    first = pixelmill("submit", *args, env=env)
    assert first.returncode == 0, first.stderr
    batch = json.loads(first.stdout)["batch"]
    _image(archive / "later.jpg", (5, 5, 5))  # the archive grows meanwhile
    second = pixelmill("submit", *args, env=env)
    found = json.loads(second.stdout)
    assert (found["batch"], found["attached"]) == (batch, True)
    assert "still in progress" in second.stderr

    run = pixelmill("run", *args, env=env)
    assert run.returncode == 0, run.stderr
    assert f"batch {batch}" in run.stderr and "waiting for it" in run.stderr
    rows = _lines(run.stdout)
    assert len(rows) == 6 and sum(not r["reused"] for r in rows) == 1  # only later.jpg
    db = sqlite3.connect(tmp_path / "jobs.db")
    assert db.execute("SELECT count(*) FROM results").fetchone() == (6,)  # nothing twice
    db.close()


def test_two_runs_started_together_share_the_work(tmp_path):
    """Two `pixelmill run` over the same folder at the same moment (two cron lines): each
    image is computed once; both exit 0 with every result."""
    archive = tmp_path / "archive"
    _archive(archive, 40)
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    cmd = [sys.executable, "-m", "pixelmill", "run", "classify", str(archive), "--model",
           "null", "--json"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert len(_lines(out)) == 40
    db = sqlite3.connect(tmp_path / "data" / "pixelmill.db")
    assert db.execute("SELECT count(*) FROM results").fetchone() == (40,)
    db.close()


@pytest.mark.parametrize("task", ["generate"])
def test_generate_is_never_reused(tmp_path, task):
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    plan = pixelmill("run", task, "--prompt", "x", "--model", "null", "--plan", env=env)
    assert plan.returncode == 2 and "--plan is for classify and caption" in plan.stderr


def test_a_file_changed_after_submit_is_filed_under_the_bytes_processed(tmp_path, redis_server,
                                                                        start_worker):  # fmt: skip
    """The worker hashes what it reads: a file replaced between submit and processing gives a
    result for its new bytes, filed under them, so the old bytes elsewhere are not given it."""
    archive = tmp_path / "archive"
    red, blue = _image(archive / "a.jpg", (250, 0, 0)), _image(tmp_path / "blue.jpg", (0, 0, 250))
    env = pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_server.url,
                        database_url=f"sqlite:///{tmp_path / 'jobs.db'}")  # fmt: skip
    red_bytes = red.read_bytes()
    sub = pixelmill("submit", "classify", str(archive), "--model", "null", "--json", env=env)
    batch = json.loads(sub.stdout)["batch"]
    shutil.copy(blue, red)  # replaced before any worker read it
    start_worker(env)
    assert json.loads(pixelmill("status", batch, "--wait", "--json", env=env).stdout)["done"] == 1
    (row,) = _lines(pixelmill("results", batch, "--json", env=env).stdout)
    assert row["sha256"] == hashlib.sha256(blue.read_bytes()).hexdigest()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "red-copy.jpg").write_bytes(red_bytes)
    plan = pixelmill("submit", "classify", str(tmp_path / "other"), "--model", "null", "--plan",
                     "--json", env=env)  # fmt: skip
    assert [r["action"] for r in _lines(plan.stdout)] == ["new"], plan.stdout


def test_force_reads_every_file_again_and_a_retargeted_link_is_changed(tmp_path):
    archive = tmp_path / "archive"
    photo = _image(archive / "p.jpg", (10, 200, 10))
    target_a = _image(tmp_path / "a.jpg", (200, 10, 10))
    target_b = _image(tmp_path / "b.jpg", (10, 10, 200))
    os.utime(target_b, ns=(target_a.stat().st_atime_ns, target_a.stat().st_mtime_ns))
    (archive / "link.jpg").symlink_to(target_a)
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    night = ("classify", str(archive), "--model", "null", "--json")
    first = {Path(r["input"]).name: r for r in _lines(_run(env, *night).stdout)}

    # Rewritten in place with the same size and mtime (the stat fast path cannot see it) and a
    # link pointed at another file of the same size and mtime (another inode: it can).
    stamp = photo.stat()
    other = Image.new("RGB", (64, 48), (11, 200, 10))
    other.save(photo, quality=95)
    os.truncate(photo, stamp.st_size) if photo.stat().st_size > stamp.st_size else None
    new_bytes = photo.read_bytes()
    os.utime(photo, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    (archive / "link.jpg").unlink()
    (archive / "link.jpg").symlink_to(target_b)
    plan = {Path(r["input"]).name: r["action"]
            for r in _lines(pixelmill("run", *night, "--plan", env=env).stdout)}  # fmt: skip
    assert plan["link.jpg"] == "changed"
    if photo.stat().st_size == stamp.st_size:
        assert plan["p.jpg"] == "reused"  # as git: same size, mtime and inode are trusted
    forced = {Path(r["input"]).name: r for r in _lines(_run(env, *night, "--force").stdout)}
    assert forced["p.jpg"]["sha256"] == hashlib.sha256(new_bytes).hexdigest()
    assert forced["p.jpg"]["sha256"] != first["p.jpg"]["sha256"]
    again = {Path(r["input"]).name: r for r in _lines(_run(env, *night, "--again").stdout)}
    assert again["p.jpg"]["reused_from"] == forced["p.jpg"]["job"]  # the fresh result now


def test_failures_are_run_again_by_the_next_identical_submit(tmp_path):
    archive = tmp_path / "archive"
    _archive(archive, 3)
    broken = archive / "broken.jpg"
    broken.write_bytes(b"not yet an image")
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    night = ("classify", str(archive), "--json")
    first = pixelmill("run", *night, env=env)
    assert first.returncode == 1
    _image(tmp_path / "fixed.jpg", (1, 1, 1))
    plan = pixelmill("run", *night, "--plan", "--json", env=env)
    actions = {Path(r["input"]).name: r["action"] for r in _lines(plan.stdout)}
    assert actions == {"broken.jpg": "new", "img00.jpg": "reused", "img01.jpg": "reused",
                       "img02.jpg": "reused"}  # fmt: skip
    again = pixelmill("run", *night, env=env)  # same files, same options: not "made before"
    assert again.returncode == 1 and "made before" not in again.stderr
    assert "1 new, 0 changed, 0 stale, 3 reused" in again.stderr


def test_again_and_force_never_attach_to_a_batch_in_progress(tmp_path, redis_server):
    archive = tmp_path / "archive"
    _archive(archive, 2)
    env = pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_server.url,
                        database_url=f"sqlite:///{tmp_path / 'jobs.db'}")  # fmt: skip
    args = ("submit", "classify", str(archive), "--model", "null", "--json")
    first = json.loads(pixelmill(*args, env=env).stdout)
    found = json.loads(pixelmill(*args, env=env).stdout)  # the same submit: that batch
    assert (found["batch"], found["existing"], found["queued"]) == (first["batch"], True, 2)
    for flag in ("--again", "--force"):
        other = json.loads(pixelmill(*args, flag, env=env).stdout)
        assert other["batch"] != first["batch"] and not other["attached"]
