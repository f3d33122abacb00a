"""Fixtures: real Redis, real PostgreSQL, real photographs, and a real worker process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _closed_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Hermetic: the Hugging Face hub is a closed loopback port for every test and every process
# they start (set before huggingface_hub is imported), so a hub name behaves the same on a host
# with a network as on one without: unreachable, at once. tests/test_hub.py points it elsewhere.
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_loopback_port()}"
os.environ.pop("HF_HUB_OFFLINE", None)

from pixelmill.settings import Settings  # noqa: E402
from tests.services import (  # noqa: E402
    PostgresServer,
    RedisServer,
    S3Server,
    postgres_bin,
    start_postgres,
    start_redis,
    start_s3,
)

ROOT = Path(__file__).resolve().parent.parent

# Photographs whose subject is unambiguous, with the ImageNet classes that name it.
PHOTOS = {
    "chelsea.png": {"tabby, tabby cat", "tiger cat", "Egyptian cat"},
    "coffee.png": {"espresso", "cup", "coffee mug"},
    "rocket.jpg": {"missile", "projectile, missile", "space shuttle"},
    "motorcycle_left.png": {"moped", "motor scooter, scooter"},
}


# A figure a test measured (a throughput ratio from `pixelmill bench`), recorded with
# ``record_property(FIGURE + "what", value)`` and printed in a "figures" section at the end of
# every run, CI's included (xdist carries the properties to the controller): so a loss in
# pixelmill's own speed is seen the day it lands, without making a test depend on the machine.
FIGURE = "figure: "


def pytest_terminal_summary(terminalreporter: Any) -> None:
    reports = [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])]
    rows = [(r.nodeid.split("::")[-1], k[len(FIGURE):], v) for r in reports
            for k, v in getattr(r, "user_properties", ()) if k.startswith(FIGURE)]  # fmt: skip
    if not rows:
        return
    terminalreporter.section("figures measured by the tests")
    for test, what, value in dict.fromkeys(rows):
        terminalreporter.write_line(f"{what}: {value}  ({test})")


def skimage_data() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if postgres_bin("initdb") is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are required in CI")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) on loopback, with authentication on."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on SQLite and on PostgreSQL (a fresh database each)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pixelmill.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database("t_" + uuid.uuid4().hex[:12])


@pytest.fixture
def sessions(database_url: str) -> Iterator[Any]:
    """A migrated database on ``database_url`` (SQLite and PostgreSQL), as a sessionmaker."""
    from pixelmill.db.engine import make_engine, make_sessionmaker
    from pixelmill.db.migrate import upgrade

    engine = make_engine(database_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_blip_captioner

    return build_tiny_blip_captioner(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="session")
def tiny_vit_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_vit_gpt2_captioner

    return build_tiny_vit_gpt2_captioner(tmp_path_factory.mktemp("tiny-vit-gpt2"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of real photographs (from scikit-image's package data)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(skimage_data() / name, folder / name)
    return folder


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """Inputs that must each fail their own job with a reason naming the file."""
    from PIL import Image

    folder = tmp_path / "bad"
    folder.mkdir()
    files = {
        "empty": folder / "empty.jpg",
        "text": folder / "notes.jpg",
        "truncated": folder / "truncated.jpg",
        "corrupt": folder / "corrupt.png",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    src = folder / "whole.jpg"
    Image.new("RGB", (320, 240), (200, 30, 30)).save(src, quality=90)
    data = src.read_bytes()
    src.unlink()
    files["truncated"].write_bytes(data[: len(data) // 3])
    png = folder / "whole.png"
    Image.new("RGB", (64, 64), (0, 128, 0)).save(png)
    raw = bytearray(png.read_bytes())
    png.unlink()
    raw[60:120] = b"\x00" * 60  # smash the IDAT data and its CRC
    files["corrupt"].write_bytes(bytes(raw))
    return files


# pytest-timeout's 600 s per test (pyproject.toml) catches a hang. The few end-to-end tests that
# start dozens of processes, each importing torch and transformers, take 3-4x longer beside two
# busy loops than on a quiet machine (search_and_relabel: 167 s quiet, 358-600 s loaded), so
# they get more room; a hang still fails them.
MANY_PROCESSES = pytest.mark.timeout(1800)


def pixelmill_env(**settings: str) -> dict[str, str]:
    """A clean environment for a pixelmill subprocess: no inherited PIXELMILL_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in settings.items():
        env["PIXELMILL_" + key.upper()] = value
    return env


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a pixelmill subprocess exactly these settings."""
    return {**pixelmill_env(), **settings.to_env()}


def pixelmill(
    *args: str, env: dict[str, str], input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixelmill", *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


class NullGate:
    """A ``null`` model that finishes an item only when the test lets it: the pixelmill
    processes started with ``env`` take a ticket per item (``prepare``), across processes,
    and wait while every ticket let out so far is taken. So a batch is really still running
    when the test acts on it, however fast or loaded the machine is; ``open`` lets everything
    through (and is called at the end of the test, so that no worker waits for ever)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.allowed = folder / "allowed"
        self.taken = folder / "taken"
        self.allowed.write_text("0")
        self.taken.write_text("0")
        (folder / "sitecustomize.py").write_text(
            "import fcntl, os, time\n"
            "import pixelmill.models.null as null\n"
            f"ALLOWED, TAKEN = {str(self.allowed)!r}, {str(self.taken)!r}\n"
            "def _ticket():\n"
            "    while True:\n"
            "        with open(TAKEN, 'r+') as fp:\n"
            "            fcntl.flock(fp, fcntl.LOCK_EX)\n"
            "            taken = int(fp.read() or 0)\n"
            "            with open(ALLOWED) as a:\n"
            "                allowed = float(a.read() or 0)\n"
            "            if taken < allowed:\n"
            "                fp.seek(0); fp.truncate(); fp.write(str(taken + 1))\n"
            "                return\n"
            "        time.sleep(0.02)\n"
            "_prepare = null.NullRunner.prepare\n"
            "def prepare(self, input, params, options):\n"
            "    _ticket()\n"
            "    return _prepare(self, input, params, options)\n"
            "null.NullRunner.prepare = prepare\n"
        )
        # An item held at the gate is still being "read" (prepare runs under the worker's read
        # deadline): on a loaded machine the test may hold it longer than the 60 s default, and
        # the job would fail as a hung file. The gate is not a hung file: no deadline here.
        self.env = {"PYTHONPATH": str(folder), "PIXELMILL_READ_TIMEOUT": "86400"}

    def allow(self, n: int) -> None:
        """Let ``n`` items in all (since the start) finish."""
        tmp = self.allowed.with_suffix(".tmp")
        tmp.write_text(str(n))
        tmp.replace(self.allowed)

    def open(self) -> None:
        self.allow(10**12)

    def waiting(self) -> bool:
        """Whether every ticket let out is taken (so the next item waits)."""
        return int(self.taken.read_text() or 0) >= float(self.allowed.read_text() or 0)


@pytest.fixture
def null_gate(tmp_path: Path) -> Iterator[NullGate]:
    gate = NullGate(tmp_path / "gate")
    try:
        yield gate
    finally:
        gate.open()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[Any]]]:
    """Start ``pixelmill ARGS...`` processes (in the checkout, with ``env``); at the end, every
    one still running gets SIGTERM (a clean stop: drain), then SIGKILL after 60 s."""
    procs: list[subprocess.Popen[Any]] = []

    def start(*args: str, env: dict[str, str], **popen: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen([sys.executable, "-m", "pixelmill", *args], env=env, cwd=ROOT,
                                **popen)  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture
def start_worker(spawn: Any) -> Callable[..., subprocess.Popen[bytes]]:
    """Start `pixelmill worker` processes; each is stopped with SIGTERM at the end."""

    def start(env: dict[str, str], devices: str = "cpu") -> subprocess.Popen[bytes]:
        return spawn("worker", "--devices", devices, env=env)  # type: ignore[no-any-return]

    return start
