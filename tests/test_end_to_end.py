"""End to end through the real parts: the CLI, Redis, a worker process, SQLite or PostgreSQL."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from pixelmill.producer import Client
from pixelmill.settings import load_settings
from pixelmill.worker.local import local_cluster
from tests.conftest import PHOTOS, pixelmill, pixelmill_env
from tests.tiny_models import TINY_LABELS, build_tiny_vit_classifier

pytestmark = pytest.mark.slow

CONTRACT_KEYS = {"job", "input", "task", "status", "result", "error", "model", "device"}


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _assert_photo_labels(line: dict) -> None:
    name = line["input"].rsplit("/", 1)[-1]
    labels = [x["label"] for x in line["result"]["labels"]]
    assert len(labels) == 5
    assert all(0.0 <= x["score"] <= 1.0 for x in line["result"]["labels"])
    assert PHOTOS[name] & set(labels), f"{name}: {labels}"


def test_run_on_the_embedded_default_classifies_photos_and_fails_only_bad_files(
    tmp_path, photos, bad_files
):
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    proc = pixelmill("run", "classify", str(photos), *map(str, bad_files.values()), "--json",
                     env=env)  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # documented: 1 when any job failed
    lines = _lines(proc.stdout)
    assert len(lines) == len(PHOTOS) + len(bad_files)
    assert len({line["job"] for line in lines}) == len(lines)
    for line in lines:
        assert set(line) >= CONTRACT_KEYS
        assert line["task"] == "classify"
        assert line["model"] == "efficientnet_lite0"
        assert line["device"] == "cpu"
    done = [x for x in lines if x["status"] == "done"]
    failed = [x for x in lines if x["status"] == "failed"]
    assert {x["input"].rsplit("/", 1)[-1] for x in done} == set(PHOTOS)
    for line in done:
        assert line["error"] is None
        _assert_photo_labels(line)
    assert {x["input"] for x in failed} == {str(p) for p in bad_files.values()}
    for line in failed:
        assert line["result"] is None and line["input"] in line["error"]
    # Everything it started is stopped again: the embedded broker's socket is gone.
    assert not (tmp_path / "data" / "redis.sock").exists()
    # The batch id is on stderr, also with --json; status without one lists the batches.
    batch = re.search(r"batch (\S+): ", proc.stderr).group(1)
    listed = _lines(pixelmill("status", "--json", env=env).stdout)
    assert [(b["batch"], b["done"], b["failed"]) for b in listed] == [
        (batch, len(PHOTOS), len(bad_files))
    ]
    # --json keeps stdout to the lines; the summary, with its pace, is on stderr.
    summary = rf"^{len(PHOTOS)} done, {len(bad_files)} failed in \S+ \(\d+\.\d images/s\)$"
    assert re.search(summary, proc.stderr, re.M), proc.stderr
    # Its failures by kind: each bad file once, under its kind, without its path in the kind.
    text = pixelmill("status", batch, env=env).stdout
    assert f"failed  {len(bad_files)} job(s)" in text, text
    assert all(text.count(str(path)) == 1 for path in bad_files.values()), text
    assert "× not an image file\n" in text and "× empty file\n" in text, text


def test_run_reads_paths_from_stdin_and_exits_0_when_all_done(tmp_path, photos):
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    paths = "\n".join(str(p) for p in sorted(photos.iterdir())[:2]) + "\n"
    proc = pixelmill("run", "classify", "-", env=env, input=paths)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 2 and all(line.startswith("done") for line in out)
    # The last line: how many, how long, how fast.
    assert re.search(r"^2 done, 0 failed in \d+\.\ds \(\d+\.\d images/s\)$", proc.stderr, re.M), (
        proc.stderr
    )
    # Again: the same submit finds its batch, all done. No work, so no rate: it says reused.
    again = pixelmill("run", "classify", "-", env=env, input=paths)
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines()[-1].startswith("2 done (2 reused), 0 failed in "), again.stderr
    assert "images/s" not in again.stderr
    # --again: a new batch, its results reused from the first (the content index).
    forced = pixelmill("run", "classify", "-", "--again", env=env, input=paths)
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.splitlines()[-1].startswith("2 done (2 reused), 0 failed in ")
    assert "images/s" not in forced.stderr


def test_submit_then_worker_on_postgres_and_redis(
    tmp_path, photos, bad_files, redis_server, postgres_server, start_worker
):
    db_url = postgres_server.create_database("e2e_cli")
    env = pixelmill_env(
        data_dir=str(tmp_path / "data"), broker_url=redis_server.url, database_url=db_url
    )
    sub = pixelmill("submit", "classify", str(photos), str(bad_files["text"]), "--json",
                    "--name", "nightly", env=env)  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    submitted = json.loads(sub.stdout)
    assert set(submitted) == {"batch", "jobs", "queued", "reused", "plan", "existing", "attached"}
    assert submitted["jobs"] == submitted["queued"] == len(PHOTOS) + 1
    assert submitted["existing"] is False
    batch = submitted["batch"]

    queued = json.loads(pixelmill("status", batch, "--json", env=env).stdout)
    assert queued["queued"] == submitted["jobs"] and queued["name"] == "nightly"

    worker = start_worker(env)
    status = pixelmill("status", batch, "--wait", "--json", env=env, timeout=300)
    counts = json.loads(status.stdout)
    assert (counts["done"], counts["failed"]) == (len(PHOTOS), 1)
    assert counts["failures"][0]["jobs"] == 1
    assert counts["failures"][0]["inputs"] == [str(bad_files["text"])]
    assert counts["failures"][0]["reason"] == "not an image file"
    assert counts["failures_not_shown"] == {"kinds": 0, "jobs": 0}

    res = pixelmill("results", batch, "--json", env=env)
    assert res.returncode == 1
    lines = _lines(res.stdout)
    assert [x["status"] for x in lines].count("done") == len(PHOTOS)
    for line in lines:
        if line["status"] == "done":
            _assert_photo_labels(line)
    human = pixelmill("status", batch, env=env).stdout
    assert "failed  1 job(s), 1 kind of failure:" in human and "done 4" in human
    assert "1 × not an image file" in human and str(bad_files["text"]) in human
    table = pixelmill("status", env=env).stdout.splitlines()
    assert table[0].split()[:2] == ["BATCH", "CREATED"] and table[1].startswith(batch)
    assert table[1].split()[-1] == "nightly"
    # SIGTERM drains and stops the worker cleanly.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(120) == 0


def test_python_api_with_a_local_hugging_face_model(tmp_path, photos, redis_server):
    model_dir = build_tiny_vit_classifier(tmp_path / "tiny-vit")
    settings = load_settings(
        data_dir=tmp_path / "data",
        broker_url=redis_server.url,
        database_url=f"sqlite:///{tmp_path / 'api.db'}",
        batch_size=3,
    )
    with local_cluster(settings, "cpu", log_dir=tmp_path / "logs"), Client(settings) as pm:
        batch = pm.submit("classify", [str(photos)], model=str(model_dir))
        assert batch.jobs == len(PHOTOS)
        counts = pm.wait(batch.batch_id, timeout=300)
        results = list(pm.results(batch.batch_id))
    assert counts.by_status == {"done": len(PHOTOS)}
    assert [r.input for r in results] == sorted(str(p) for p in photos.iterdir())
    for r in results:
        assert r.model == str(model_dir)
        assert {x["label"] for x in r.result["labels"]} <= set(TINY_LABELS)
        assert len(r.result["labels"]) == 5


QUIET_SCRIPT = """
import os, signal, sys, time
from pixelmill import Client, load_settings, local_cluster

settings = load_settings()
with local_cluster(settings, "cpu") as cluster, Client(settings) as pm:
    # A worker killed under the script is restarted, as under `pixelmill run`.
    first = cluster.children[0].process
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 300  # a loaded machine takes a minute to import torch
    while time.monotonic() < deadline:  # until the new worker is consuming, not only started
        now, ready = cluster.children[0].process, cluster.children[0].ready_file
        if now is not None and now.pid != first.pid and ready is not None and ready.exists():
            break
        time.sleep(0.2)
    print("restarted", now is not None and now.pid != first.pid)
    batch = pm.submit("classify", sys.argv[1:], model=None)
    pm.wait(batch.batch_id, timeout=300)
    for job in pm.results(batch.batch_id):
        print(job.status, job.input)
"""


def test_the_python_api_keeps_the_scripts_stderr_quiet_and_watches_its_workers(tmp_path, photos):
    """The README's script: no Celery banner, warning or log line of the workers on the
    script's stderr (they go to DATA_DIR/logs, as for `pixelmill run`)."""
    script = tmp_path / "script.py"
    script.write_text(QUIET_SCRIPT)
    names = sorted(str(p) for p in photos.iterdir())[:2]
    proc = subprocess.run(
        [sys.executable, str(script), *names],
        env=pixelmill_env(data_dir=str(tmp_path / "data")),
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # Only what the script should know: the worker it killed, restarted.
    assert proc.stderr == "worker cpu exited with -9; restarting in 1s\n"
    assert proc.stdout.splitlines() == ["restarted True", *(f"done {n}" for n in names)]
    logs = {p.name: p.read_text() for p in (tmp_path / "data" / "logs").iterdir()}
    assert "worker-cpu.log" in logs and "device worker pixelmill-cpu@" in logs["worker-cpu.log"]
    # The logs hold the workers' own lines: not Celery's banner, nor its warning about root
    # once per process (the tests run as root; `pixelmill worker` says so once, itself).
    every = "".join(logs.values())
    assert "SecurityWarning" not in every and "superuser" not in every, every
    assert "[config]" not in every and "[queues]" not in every, every
    # One stop signal for the restarted worker, the drain's: the parent-death signal comes when
    # the *thread* that started a worker ends, and the watch thread that restarted it used to
    # end before the drain began (two "Warm shutdown"s, every time).
    assert logs["worker-cpu.log"].count("Warm shutdown") == 1, logs["worker-cpu.log"]


def test_usage_errors_exit_2_and_unreachable_broker_exits_3(tmp_path, photos):
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    missing = pixelmill("submit", "classify", str(tmp_path / "nope.jpg"), env=env)
    assert missing.returncode == 2 and "nope.jpg" in missing.stderr
    assert pixelmill("run", "paint", str(photos), env=env).returncode == 2
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert pixelmill("submit", "classify", str(empty), env=env).returncode == 2
    # Nothing configured and no embedded broker running: submit says how to get one.
    down = pixelmill("submit", "classify", str(photos), env=env)
    assert down.returncode == 3
    assert "pixelmill worker" in down.stderr and "Traceback" not in down.stderr
    unknown = pixelmill("status", "no-such-batch", env=env)
    assert unknown.returncode == 2 and "no-such-batch" in unknown.stderr
