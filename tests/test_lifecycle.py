"""What `pixelmill run` and `pixelmill worker` start, they own and clean up: signals really sent
to real processes on the embedded default (embedded Redis, SQLite, local workers)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import termios
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from PIL import Image

from pixelmill.settings import load_settings
from pixelmill.worker.embedded import ping
from tests.conftest import ROOT, pixelmill, pixelmill_env
from tests.services import PostgresServer, RedisServer

pytestmark = pytest.mark.slow
T = TypeVar("T")

FAST = {"lease_seconds": "4", "queued_lease_seconds": "3", "reconcile_interval": "1",
        "max_attempts": "3"}  # fmt: skip


def _until(check: Callable[[], T], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


def _env(tmp_path: Path, *, slow: float = 0.0, crash: bool = False, **extra: str) -> dict[str, str]:
    """The embedded default in ``tmp_path/data``; ``slow``: seconds the null model spends on
    each item (injected in the real worker processes); ``crash``: an input named crashme*
    ends its worker process at once, as a native crash would."""
    env = pixelmill_env(data_dir=str(tmp_path / "data"), **extra)
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
        import os, time
        import pixelmill.models.null as null

        _prepare = null.NullRunner.prepare

        def prepare(self, input, params, options):
            if {crash!r} and "crashme" in str(input):
                os._exit(70)
            time.sleep({slow!r})
            return _prepare(self, input, params, options)

        null.NullRunner.prepare = prepare
    """)
    )
    env["PYTHONPATH"] = str(hook)
    return env


def _inputs(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (10, 200, 30)).save(folder / "seed.png")
    first = folder / "seed.png"
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.png"
        os.link(first, path)
        paths.append(str(path))
    first.unlink()
    return paths


def _socket(tmp_path: Path) -> Path:
    return load_settings(data_dir=tmp_path / "data").embedded_socket


def in_use(socket_path: Path) -> bool:
    """Whether any process holds the embedded broker's users lock."""
    import fcntl as locks

    from pixelmill.worker.embedded import users_lock_path

    fd = os.open(users_lock_path(socket_path), os.O_RDWR)
    try:
        locks.flock(fd, locks.LOCK_EX | locks.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _processes(tmp_path: Path) -> dict[int, str]:
    """Every live process that belongs to this test's data dir: its workers (by their
    environment), the broker's keeper and redis-server (by their command lines)."""
    marks = [str(tmp_path / "data").encode(), str(_socket(tmp_path)).encode()]
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if any(m in cmdline or m in environ for m in marks):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def _workers(tmp_path: Path) -> dict[int, str]:
    return {p: c for p, c in _processes(tmp_path).items() if "worker.device_main" in c}


def _nothing_left(tmp_path: Path, timeout: float = 30) -> None:
    _until(lambda: not _processes(tmp_path), f"left running: {_processes(tmp_path)}", timeout)


def _start_run(env: dict[str, str], *args: str, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "run", "classify", *args, "--model", "null",
         "--devices", "cpu"],
        env=env, cwd=ROOT, text=True,
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen},  # type: ignore[arg-type]
    )  # fmt: skip


def _jobs(tmp_path: Path) -> dict[str, int]:
    db = sqlite3.connect(tmp_path / "data" / "pixelmill.db")
    try:
        return dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
    finally:
        db.close()


def _started(tmp_path: Path, n: int = 1) -> None:
    """Wait until the run's workers are taking jobs."""
    _until(
        lambda: (tmp_path / "data" / "pixelmill.db").exists() and _jobs_done(tmp_path) >= n,
        "the run's workers never finished a job",
        120,
    )


def _jobs_done(tmp_path: Path) -> int:
    try:
        return _jobs(tmp_path).get("done", 0)
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGTERM, terminal frozen"])
def test_run_stopped_by_sigterm_or_sighup_drains_and_leaves_nothing_running(
    tmp_path: Path, how: str
) -> None:
    """The run's controlling terminal is a pty: closing its master is what a closed SSH
    session does (the kernel sends SIGHUP; writing to the terminal then fails with EIO).
    A frozen one (an SSH session whose sshd no longer reads, or Ctrl-S) blocks every write:
    `run` stopped there used to wait for ever (rich's progress thread, blocked in a write,
    held the console lock the stop needed); now output that takes nothing for 3 s while
    stopping goes to /dev/null, and the drain goes on."""
    paths = _inputs(tmp_path / "in", 400)
    env = _env(tmp_path, slow=0.05, batch_size="8")
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    run = _start_run(env, *paths, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                     preexec_fn=controlling_terminal)  # fmt: skip
    sig = signal.SIGHUP if how == "SIGHUP" else signal.SIGTERM
    try:
        _started(tmp_path)
        workers = _workers(tmp_path)
        assert len(workers) == 2, workers
        if how == "SIGHUP":
            os.close(master)  # the hangup
        else:
            if "frozen" in how:
                termios.tcflow(slave, termios.TCOOFF)  # Ctrl-S: it takes no more output
            run.send_signal(sig)
        assert run.wait(130) == 128 + sig
    finally:
        if run.poll() is None:
            run.kill()
        os.close(slave)
        if sig != signal.SIGHUP:
            os.close(master)
    _nothing_left(tmp_path)
    counts = _jobs(tmp_path)
    assert counts.get("running", 0) == 0, counts  # the running batches were drained
    assert counts.get("done", 0) > 0 and counts.get("queued", 0) > 0, counts


def test_run_killed_with_sigkill_takes_its_workers_and_broker_with_it(tmp_path: Path) -> None:
    paths = _inputs(tmp_path / "in", 400)
    env = _env(tmp_path, slow=0.05, batch_size="8")
    run = _start_run(env, *paths)
    try:
        _started(tmp_path)
        assert len(_workers(tmp_path)) == 2
        assert ping(_socket(tmp_path))
        run.kill()
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
    # The workers get the parent-death signal and drain; the broker stays while they do (they
    # use it too), and the keeper stops redis-server once no process uses it.
    _nothing_left(tmp_path, timeout=60)
    assert not ping(_socket(tmp_path))
    logs = "".join(p.read_text() for p in (tmp_path / "data" / "logs").glob("worker-*.log"))
    assert "Error 2 connecting" not in logs and "Connection refused" not in logs, logs[-3000:]


def test_a_new_supervisor_waits_for_the_devices_of_one_still_running(tmp_path: Path) -> None:
    env = _env(tmp_path, slow=0.0)
    first = subprocess.Popen([sys.executable, "-m", "pixelmill", "worker", "--devices", "cpu",
                              "--cpu-workers", "2"], env=env, cwd=ROOT)  # fmt: skip
    second: subprocess.Popen[str] | None = None
    try:
        old = _until(lambda: len(w := _workers(tmp_path)) == 2 and w, "first workers", 60)
        said = tmp_path / "second.err"
        with said.open("w") as err:
            second = subprocess.Popen(
                [sys.executable, "-m", "pixelmill", "worker", "--devices", "cpu",
                 "--cpu-workers", "2"], env=env, cwd=ROOT, stderr=err, text=True,
            )  # fmt: skip
        # Until the second supervisor found both devices taken, and said it waits for them.
        _until(lambda: said.read_text().count("already has a worker") == 2,
               "the second supervisor never said it waits for both devices", 120)  # fmt: skip
        assert _workers(tmp_path) == old  # never a second worker on a device
        # The first supervisor killed outright: its workers go with it, then (and only then)
        # the second one's start.
        first.kill()
        first.wait(10)
        new = _until(
            lambda: len(w := _workers(tmp_path)) == 2 and not set(w) & set(old) and w,
            f"second supervisor's workers: {_workers(tmp_path)}",
            120,
        )
        assert not set(new) & set(old)
        assert second.poll() is None
        second.send_signal(signal.SIGTERM)
        assert second.wait(130) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    _nothing_left(tmp_path)


def test_two_overlapping_runs_share_the_embedded_broker(tmp_path: Path) -> None:
    long_inputs = _inputs(tmp_path / "long", 300)
    short_inputs = _inputs(tmp_path / "short", 5)
    env = _env(tmp_path, slow=0.05, batch_size="8")
    long_run = _start_run(env, *long_inputs, "--json")
    try:
        _started(tmp_path)
        short = pixelmill("run", "classify", *short_inputs, "--model", "null", "--json",
                          env=env, timeout=180)  # fmt: skip
        assert short.returncode == 0, short.stderr
        assert long_run.poll() is None  # still going: the short run left the broker to it
        out, err = long_run.communicate(timeout=240)
        assert long_run.returncode == 0, err
        assert len([json.loads(line) for line in out.splitlines()]) == 300
    finally:
        if long_run.poll() is None:
            long_run.kill()
    _nothing_left(tmp_path)


@pytest.mark.parametrize("victim", ["redis-server", "keeper"])
def test_a_broker_that_dies_mid_run_is_started_again_and_the_run_finishes(
    tmp_path: Path, victim: str
) -> None:
    paths = _inputs(tmp_path / "in", 200)
    env = _env(tmp_path, slow=0.05, batch_size="8", **FAST)
    run = _start_run(env, *paths, "--json")
    try:
        _started(tmp_path)
        marker = "redis-server" if victim == "redis-server" else "worker.embedded"
        (pid,) = [p for p, c in _processes(tmp_path).items() if marker in c]
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert len(lines) == 200 and {x["status"] for x in lines} == {"done"}
    finally:
        if run.poll() is None:
            run.kill()
    _nothing_left(tmp_path)


def test_the_embedded_broker_stays_while_any_process_uses_it(tmp_path: Path) -> None:
    from pixelmill.worker.embedded import EmbeddedRedis

    sock, data = _socket(tmp_path), tmp_path / "data"
    first = EmbeddedRedis(sock, data).start()
    second = EmbeddedRedis(sock, data).start()
    assert ping(sock) and in_use(sock)
    first.stop()
    time.sleep(2)
    assert ping(sock)  # the second user still has it
    second.stop()
    _until(lambda: not ping(sock), "the broker outlived its last user", 15)
    _nothing_left(tmp_path)


def test_run_timeout_prints_the_results_so_far_and_exits_4(tmp_path: Path, null_gate) -> None:
    """The gate lets 13 items through, then holds the rest until the results are printed:
    2 workers hold at most 4 messages of 4 at once, so 12 tickets can be spread over them
    and the 13th completes one, however loaded the machine. The --timeout only has to be
    longer than the workers take to start (it was 12 s with a 1 s sleep per item, and on a
    loaded machine no message was done by then)."""
    paths = _inputs(tmp_path / "in", 100)
    env = {**pixelmill_env(data_dir=str(tmp_path / "data"), batch_size="4"), **null_gate.env}
    null_gate.allow(13)
    run = subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "run", "classify", *paths, "--model", "null",
         "--json", "--timeout", "45"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert run.stdout is not None
        lines = [json.loads(run.stdout.readline() or "null") for _ in range(100)]
        null_gate.open()  # printed: the held items may finish, and the workers drain at once
        _, stderr = run.communicate(timeout=240)
    finally:
        run.kill()
    assert run.returncode == 4, stderr
    assert "Traceback" not in stderr
    assert "timed out after 45s" in stderr
    states = {x["status"] for x in lines}
    assert "done" in states and states & {"queued", "running"}, states
    _nothing_left(tmp_path)


def test_run_survives_crashing_workers_and_fails_only_the_input_that_kills_them(
    tmp_path: Path,
) -> None:
    paths = _inputs(tmp_path / "in", 30)
    crasher = tmp_path / "in" / "crashme.png"
    os.link(paths[0], crasher)
    env = _env(tmp_path, crash=True, batch_size="8", **FAST)
    result = pixelmill("run", "classify", *paths[:10], str(crasher), *paths[10:], "--model",
                       "null", "--json", env=env, timeout=400)  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [x for x in lines if x["status"] == "failed"]
    assert [x["input"] for x in failed] == [str(crasher)]
    assert "gave up after 3 attempts" in failed[0]["error"]
    assert sum(x["status"] == "done" for x in lines) == 30
    _nothing_left(tmp_path)


def test_run_gives_up_with_exit_3_when_its_workers_cannot_start(tmp_path: Path) -> None:
    env = _env(tmp_path)
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        "with open('/proc/self/cmdline', 'rb') as f:\n"
        "    if b'worker.device_main' in f.read():\n"
        "        raise SystemExit(9)\n"
    )
    paths = _inputs(tmp_path / "in", 3)
    result = pixelmill("run", "classify", *paths, "--model", "null", "--devices", "cpu",
                       env=env, timeout=240)  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "before it could take any work" in result.stderr
    _nothing_left(tmp_path)


def test_run_exits_3_when_the_embedded_broker_cannot_be_brought_back(tmp_path: Path) -> None:
    from pixelmill.worker.embedded import redis_server_binary

    # A redis-server that starts only while the flag file is there.
    flag = tmp_path / "redis-may-start"
    flag.touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "redis-server"
    fake.write_text(f'#!/bin/sh\n[ -e "{flag}" ] || exit 1\nexec "{redis_server_binary()}" "$@"\n')
    fake.chmod(0o755)
    paths = _inputs(tmp_path / "in", 200)
    env = _env(tmp_path, slow=0.05, batch_size="8", service_timeout="5")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    run = _start_run(env, *paths)
    try:
        _started(tmp_path)
        flag.unlink()
        (keeper,) = [p for p, c in _processes(tmp_path).items() if "worker.embedded" in c]
        os.kill(keeper, signal.SIGKILL)  # its redis-server goes with it
        _out, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 3, err
    assert "the embedded broker has not answered for 5s" in err
    _nothing_left(tmp_path)


def test_run_exits_3_when_the_database_stays_away(
    tmp_path: Path, redis_server: RedisServer, postgres_server: PostgresServer
) -> None:
    url = postgres_server.create_database("t_" + uuid.uuid4().hex[:12])
    paths = _inputs(tmp_path / "in", 20)
    env = pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_server.url,
                        database_url=url, service_timeout="5", queue=uuid.uuid4().hex)  # fmt: skip
    # No worker serves this queue: the run waits on the database alone.
    run = subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "run", "classify", *paths, "--model", "null",
         "--no-local-workers"],
        env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert run.stderr is not None
        assert "20 jobs" in run.stderr.readline()
        postgres_server.halt()
        try:
            _out, err = run.communicate(timeout=120)
        finally:
            postgres_server.start()
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 3, err
    assert "the database has not answered for 5s" in err
    assert "Traceback" not in err


def test_run_whose_reader_goes_away_still_exits_by_its_jobs(tmp_path: Path) -> None:
    """`pixelmill run ... | head -1`: the rest of the output is dropped, the exit status still
    says how the jobs ended (0: all done), and there is no traceback."""
    paths = _inputs(tmp_path / "in", 2000)
    env = _env(tmp_path, batch_size="256")
    run = _start_run(env, *paths, "--json")
    try:
        assert run.stdout is not None and run.stderr is not None
        first = run.stdout.readline()
        assert json.loads(first)["status"] == "done"
        run.stdout.close()  # what `head -1` does after its line
        err = run.stderr.read()
        assert run.wait(120) == 0, err
        assert "Traceback" not in err and "BrokenPipe" not in err
    finally:
        if run.poll() is None:
            run.kill()
    _nothing_left(tmp_path)
