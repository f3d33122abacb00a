"""Real services for the tests: a redis-server on a loopback port and a PostgreSQL server on a
temporary data directory. Nothing here is a mock."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from worker.embedded import redis_server_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_redis(workdir: Path) -> RedisServer:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port, proc, workdir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if server.client().ping():
                return server
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


@dataclass
class PostgresServer:
    port: int
    datadir: Path
    as_user: list[str]

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        pg_ctl = postgres_bin("pg_ctl")
        subprocess.run(
            [*self.as_user, pg_ctl or "pg_ctl", "-D", str(self.datadir), "-m", "fast", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.datadir.parent, ignore_errors=True)

    def start(self) -> None:
        pg_ctl = postgres_bin("pg_ctl")
        log = self.datadir.parent / "postgres.log"
        subprocess.run(
            [
                *self.as_user,
                pg_ctl or "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(log),
                "-w",
                "-o",
                f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.datadir.parent}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                "start",
            ],  # fmt: skip
            check=True,
            capture_output=True,
        )


def start_postgres() -> PostgresServer:
    """initdb on a temporary directory (as the ``postgres`` user when we are root, since initdb
    refuses root), then start it on a free loopback port with trust auth."""
    initdb = postgres_bin("initdb")
    if initdb is None:
        raise FileNotFoundError("initdb not found")
    base = Path(tempfile.mkdtemp(prefix="pixelmill-pg-"))
    datadir = base / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, initdb, "-D", str(datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
         "--no-sync"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = PostgresServer(free_port(), datadir, as_user)
    server.start()
    return server
