"""Small things an unattended run must get right (issue 9, case 10): no URL password printed,
whatever it holds; Flower's password off its command line; one stale path on stdin fails one
job; one job, one line of text; phone photos found and decoded; a reading command that finds
no database says so and creates nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pixelmill.producer.client import JobResult
from pixelmill.producer.inputs import expand_inputs
from pixelmill.producer.output import write_text_lines
from pixelmill.settings import load_settings, mask_url
from tests.conftest import ROOT, pixelmill, pixelmill_env
from tests.services import free_port

# Every piece of this password is a word of its own: none may appear in any output.
PASSWORD = "alpha#bravo/charlie?delta@echo:foxtrot"
PIECES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")


def _shows_password(text: str) -> list[str]:
    return [piece for piece in PIECES if piece in text]


@pytest.mark.parametrize(
    "password",
    ["alpha#bravo", "alpha/bravo", "alpha?bravo", "alpha@bravo", "alpha:bravo", PASSWORD],
)
@pytest.mark.parametrize(
    "template",
    [
        "redis://:{pw}@redis.example:6379/0",
        "rediss://default:{pw}@redis.example:6380/1",
        "postgresql+psycopg://pixelmill:{pw}@db.example:5432/pixelmill",
        "redis+socket://:{pw}@/run/redis/redis.sock",
    ],
)
def test_mask_url_hides_any_password(template, password):
    from pixelmill.settings import mask_secrets

    url = template.format(pw=password)
    masked = mask_url(url)
    assert not _shows_password(masked), masked
    assert "***" in masked
    assert masked.endswith(template.split("{pw}@", 1)[1])  # host, port and path still shown
    # The same once the settings have percent-encoded it, and inside any error text.
    field = "database_url" if url.startswith("postgresql") else "broker_url"
    encoded = getattr(load_settings(**{field: url}), field)
    assert encoded != url and not _shows_password(mask_url(encoded))
    error = f"Cannot connect to {url}: auth failed for {password!r} ({encoded})"
    assert not _shows_password(mask_secrets(error, url)), mask_secrets(error, url)


def test_a_password_with_url_characters_reaches_redis_and_the_database_intact():
    """Masking aside, such a password is not cut at its '#' or '/' (which made the broker's
    host and port out of pieces of it, and printed them in the error)."""
    from kombu.utils.url import parse_url
    from sqlalchemy.engine import make_url

    settings = load_settings(
        broker_url=f"redis://:{PASSWORD}@127.0.0.1:6379/0",
        database_url=f"postgresql://pixelmill:{PASSWORD}@db.example:5432/pixelmill",
    )
    broker = parse_url(settings.resolved_broker_url())
    assert (broker["password"], broker["hostname"], broker["port"]) == (PASSWORD, "127.0.0.1", 6379)
    database = make_url(settings.resolved_database_url())
    assert (database.password, database.host, database.database) == (
        PASSWORD,
        "db.example",
        "pixelmill",
    )
    # Already percent-encoded stays as it is.
    again = load_settings(broker_url=settings.resolved_broker_url())
    assert again.resolved_broker_url() == settings.resolved_broker_url()


def _unreachable_broker() -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"


@pytest.mark.slow
def test_the_worker_banner_and_logs_never_show_the_broker_password(tmp_path):
    env = pixelmill_env(
        data_dir=str(tmp_path / "data"),
        broker_url=_unreachable_broker(),
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
    )
    log = tmp_path / "worker.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pixelmill", "worker", "--devices", "cpu", "--cpu-workers",
             "2"],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        # Until its device worker has failed to connect at least once (or gave up trying).
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            seen = log.read_text(errors="replace")
            if "Cannot connect to" in seen and "reconciler: the broker" in seen:
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "pixelmill worker:" in text and "redis://:***@127.0.0.1:" in text, text[-3000:]
    assert "Cannot connect to" in text, text[-3000:]  # connection refused, not a parse error
    # Each process by its own name; root said once, by the supervisor's header; no Celery
    # banner (it repeated the header in each process) nor Celery's root warning in each one.
    assert "started worker cpu on cpu (pid" in text and "started worker cpu-1 on cpu (pid" in text
    header = next(x for x in text.splitlines() if x.startswith("pixelmill worker:"))
    assert header.startswith("pixelmill worker: cpu, cpu-1 ("), header
    assert header.endswith(" (running as root)") == (os.geteuid() == 0), header
    assert "superuser" not in text and "SecurityWarning" not in text, text[-3000:]
    assert "[config]" not in text and "[queues]" not in text, text[-3000:]
    assert not _shows_password(text), _shows_password(text)
    # A broker away is one line per attempt, naming it (masked) and when it is tried again;
    # a traceback is for bugs.
    assert "Traceback" not in text, text[-3000:]
    retry = r"Cannot connect to redis://:\*\*@127\.0\.0\.1:\d+/0: .+ Trying again in [\d.]+ seconds"
    assert re.search(retry, text), text[-3000:]
    away = (
        r"reconciler: the broker redis://:\*\*\*@127\.0\.0\.1:\d+/0 cannot be reached \(.+\); next"
    )
    assert re.search(away, text), text[-3000:]


def test_a_broker_error_never_shows_the_password(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    env = pixelmill_env(
        data_dir=str(tmp_path / "data"),
        broker_url=_unreachable_broker(),
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
    )
    proc = pixelmill("submit", "classify", str(image), env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "cannot reach the broker at redis://:***@127.0.0.1:" in proc.stderr
    assert not _shows_password(proc.stderr + proc.stdout), proc.stderr


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "flower exited"
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"flower never listened on port {port}")


def _status(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_flower_password_is_not_on_its_command_line(tmp_path, redis_server):
    env = pixelmill_env(data_dir=str(tmp_path), broker_url=redis_server.url)
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "flower", f"--port={port}",
         "--basic-auth=ops:Sekr1t-Flower-Pw"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_listening(port, flower)
        cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"flower" in cmdline  # the process that serves (pixelmill exec'd into it)
        assert b"Sekr1t-Flower-Pw" not in cmdline, cmdline
        # ... and the password still guards it.
        url = f"http://127.0.0.1:{port}/workers"
        assert _status(url) == 401
        assert _status(url, "ops:wrong") == 401
        assert _status(url, "ops:Sekr1t-Flower-Pw") == 200
    finally:
        flower.terminate()
        try:
            flower.wait(30)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()


@pytest.mark.parametrize("auth", [":", "ops:", ":pw", "ops", "ops:pw,:"])
def test_flower_refuses_an_empty_user_or_password(tmp_path, auth):
    env = pixelmill_env(data_dir=str(tmp_path))
    proc = pixelmill("flower", f"--port={free_port()}", f"--basic-auth={auth}", env=env,
                     timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "user:password" in proc.stderr


def _images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / name
        Image.new("RGB", (16, 16), (10, 120, 200)).save(path, format="PNG")
        paths.append(path)
    return paths


@pytest.mark.slow
def test_a_missing_path_on_stdin_fails_its_job_and_the_rest_run(tmp_path, redis_server):
    env = pixelmill_env(
        data_dir=str(tmp_path / "data"),
        broker_url=redis_server.url,
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
    )
    real = _images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    missing = tmp_path / "in" / "gone.png"
    lines = [str(real[0]), str(missing), str(real[1]), str(real[2])]
    proc = pixelmill("run", "classify", "-", "--model", "null", "--devices", "cpu", "--json",
                     env=env, input="\n".join(lines) + "\n")  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # some job failed; the submission was not refused
    jobs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [j["input"] for j in jobs] == lines
    assert {j["input"]: j["status"] for j in jobs if j["status"] == "done"} == {
        str(p): "done" for p in real
    }
    (failed,) = [j for j in jobs if j["status"] == "failed"]
    assert failed["input"] == str(missing)
    assert str(missing) in failed["error"]
    assert "no such file or directory" in failed["error"].lower()
    # Typed as an argument, a missing path is a typo: refused, naming it, nothing submitted.
    typo = pixelmill("submit", "classify", str(real[0]), str(missing), "--model", "null",
                     env=env)  # fmt: skip
    assert typo.returncode == 2
    assert f"{missing}: no such file or directory" in typo.stderr


@pytest.mark.slow
def test_text_output_keeps_a_file_name_with_a_newline_on_one_line(tmp_path, redis_server):
    env = pixelmill_env(
        data_dir=str(tmp_path / "data"),
        broker_url=redis_server.url,
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
    )
    folder = tmp_path / "in"
    _images(folder, ["plain.png", "two\nlines.png"])
    (folder / "broken\nname.jpg").symlink_to(folder / "nowhere.jpg")  # fails, its error naming it
    proc = pixelmill("run", "classify", str(folder), "--devices", "cpu", "--model", "null",
                     env=env)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 3, out
    assert any(line.startswith("done") and "two\\nlines.png" in line for line in out), out
    (failed,) = [line for line in out if line.startswith("FAILED")]
    assert "broken\\nname.jpg" in failed, failed


def test_text_lines_escape_control_characters_as_the_json_does():
    row = JobResult(
        job="j1", input="/in/a\nb\x1b[31m.jpg", task="classify", status="failed", result=None,
        error="/in/a\nb\x1b[31m.jpg: not an image file", model="m", device="cpu",
    )  # fmt: skip
    out = io.StringIO()
    assert write_text_lines([row], out) == (0, 1)
    text = out.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text
    assert "/in/a\\nb\\u001b[31m.jpg" in text
    assert json.dumps(row.input)[1:-1] in text  # the same escape as the JSON line


def test_a_folder_scan_finds_phone_and_modern_formats(tmp_path):
    names = ["a.avif", "b.heic", "c.HEIF", "d.jfif", "e.jpg"]
    for name in [*names, "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    found = [Path(p).name for p in expand_inputs([str(tmp_path)])]
    assert found == sorted(names)


def test_heic_and_avif_decode_to_rgb(tmp_path):
    from pixelmill.models.images import decode_image  # registers the HEIC opener

    for name, fmt in (("photo.heic", "HEIF"), ("photo.avif", "AVIF")):
        path = tmp_path / name
        Image.new("RGB", (64, 48), (200, 30, 30)).save(path, format=fmt, quality=95)
        image = decode_image(path)
        assert (image.mode, image.size) == ("RGB", (64, 48)), name
        r, g, b = image.getpixel((32, 24))
        assert r > 150 and g < 80 and b < 80, (name, r, g, b)


def test_reading_commands_never_create_a_database(tmp_path):
    missing_dir = tmp_path / "nonexistent" / "dir"
    env = pixelmill_env(
        data_dir=str(tmp_path / "data"), database_url=f"sqlite:///{missing_dir / 'x.db'}"
    )
    for args in (["status"], ["status", "some-batch"], ["results", "b1"], ["retry", "b1"]):
        proc = pixelmill(*args, env=env, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert f"no database at {missing_dir / 'x.db'} (nothing submitted yet?)" in proc.stderr
    assert not (tmp_path / "nonexistent").exists()
    assert not (tmp_path / "data").exists()
    # The embedded default too: no data dir, no database appears.
    embedded = pixelmill_env(data_dir=str(tmp_path / "fresh"))
    proc = pixelmill("status", env=embedded, timeout=120)
    assert proc.returncode == 2 and "no database at" in proc.stderr, proc.stderr
    assert not (tmp_path / "fresh").exists()


def test_a_configured_sqlite_folder_that_is_missing_is_an_error_naming_it(tmp_path):
    image = _images(tmp_path / "in", ["a.png"])[0]
    missing_dir = tmp_path / "typo" / "dir"
    env = pixelmill_env(
        data_dir=str(tmp_path / "data"),
        broker_url=_unreachable_broker(),
        database_url=f"sqlite:///{missing_dir / 'x.db'}",
    )
    for args in (["submit", "classify", str(image)], ["worker", "--devices", "cpu"]):
        proc = pixelmill(*args, env=env, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert str(missing_dir) in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_a_path_list_with_windows_line_endings_names_the_files(tmp_path):
    import io

    from pixelmill.producer.inputs import expand_inputs

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    paths = expand_inputs(["-"], stdin=io.StringIO(f"{a}\r\n{b}\r\n"))
    assert paths == [str(a), str(b)]


def test_failures_text_says_how_many_inputs_and_kinds_are_not_shown():
    from pixelmill.db.records import FailureExample, FailureGroup, Failures
    from pixelmill.producer.output import failures_json, failures_text

    examples = [
        FailureExample(f"/in/{i}.jpg", f"/in/{i}.jpg: truncated ({i} bytes)") for i in range(3)
    ]
    found = Failures([FailureGroup("truncated", 10, examples)], kinds=3, jobs=14)
    lines = failures_text(found, "b1")
    assert lines[0] == "failed  14 job(s), 3 kinds of failure:"
    assert lines[1] == "  10 × truncated"
    assert lines[2].endswith("/in/0.jpg  (0 bytes)")
    assert lines[4].endswith("/in/2.jpg  (2 bytes)")
    assert lines[5].endswith("… and 7 more")
    assert lines[6].startswith("  … and 2 more kind(s) of failure (4 job(s)) not shown")
    assert "pixelmill results b1" in lines[6]
    data = failures_json(found)
    assert data["failures_not_shown"] == {"kinds": 2, "jobs": 4}
    assert data["failures"][0]["examples"][0] == {"input": "/in/0.jpg", "detail": "(0 bytes)"}


def test_the_worker_header_names_each_process_once():
    from pixelmill.worker.devices import DeviceSpec, cpu_workers, describe_devices

    assert describe_devices(cpu_workers(2)) == "cpu, cpu-1 (1 torch thread each)"
    assert describe_devices([DeviceSpec("cuda:0", "0"), DeviceSpec("cuda:1", "1")]) == (
        "cuda0, cuda1"
    )


def test_runs_closing_rate_is_the_workers_over_the_images_they_processed():
    """Not the whole wall time (start-up and model loading are in the time, not the rate), and
    no rate for a run that processed nothing."""
    from datetime import UTC, datetime, timedelta

    from pixelmill.cli.run import summary
    from pixelmill.db.records import BatchCounts

    first = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
    pace = BatchCounts("b", "classify", "m", None, total=13, started_at=first,
                       last_finished_at=first + timedelta(seconds=3))  # fmt: skip
    assert summary(12, 1, 4, 9.4, 9, pace) == "12 done (4 reused), 1 failed in 9.4s (3.0 images/s)"
    assert summary(6, 0, 6, 1.7, 0, None) == "6 done (6 reused), 0 failed in 1.7s"
    assert summary(0, 0, 0, 0.4) == "0 done, 0 failed in 0.4s"


def test_no_input_images_says_where_it_looked_and_for_what(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    proc = pixelmill("submit", "classify", str(folder), env=pixelmill_env(data_dir=str(tmp_path)))
    assert proc.returncode == 2
    assert f"no input images found in {folder}: folders are searched recursively" in proc.stderr
    assert ".jpg" in proc.stderr and ".heic" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_demo_uses_its_own_data_folder_and_says_where(tmp_path):
    """scripts/demo never writes into the user's data folder (nor uses their services)."""
    demo, theirs = tmp_path / "demo", tmp_path / "theirs"
    env = pixelmill_env(data_dir=str(theirs), broker_url="redis://127.0.0.1:1/0")
    env["PIXELMILL_DEMO_DIR"] = str(demo)
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0].startswith(f"demo: data folder {demo} (not yours")
    assert len(proc.stdout.splitlines()) == 6
    assert (demo / "pixelmill.db").exists() and not theirs.exists()


def test_status_pace_gives_the_rate_and_while_running_the_time_left_and_the_end():
    from datetime import UTC, datetime, timedelta

    from pixelmill.db.records import BatchCounts
    from pixelmill.producer.output import pace

    started = datetime.now(UTC) - timedelta(seconds=100)
    states = {"done": 18, "failed": 2, "running": 4, "queued": 36}
    running = BatchCounts(
        "b", "classify", "m", None, total=60, started_at=started, by_status=states
    )
    text = pace(running, clock=True)
    assert re.fullmatch(r"0\.2 items/s, about 3m\d\ds left \(ends ~\d\d:\d\d:\d\d\)", text), text
    assert re.fullmatch(r"0\.2 items/s, ETA 3m\d\ds", pace(running)), pace(running)
    done = BatchCounts("b", "classify", "m", None, total=20, started_at=started,
                       last_finished_at=started + timedelta(seconds=40),
                       by_status={"done": 20}, reused=10)  # fmt: skip
    assert pace(done, clock=True) == "0.2 items/s"  # reused jobs are not counted as work
