"""The device supervisor: one worker process per device, restarted when it crashes, drained on
SIGTERM. Processes are started fresh (``subprocess``), so CUDA is never inherited by a fork."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixelmill.errors import ConfigError
from pixelmill.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class DeviceSpec:
    label: str  # "cpu" or "cuda:N" (physical index)
    visible: str | None  # what CUDA_VISIBLE_DEVICES is pinned to; None for the CPU
    slot: int = 0  # several CPU workers: 0, 1, ...
    threads: int | None = None  # torch threads for a CPU worker (None: every core)

    @property
    def name(self) -> str:
        """Unique per host: cpu, cpu-1, cuda0 (worker node names and log files)."""
        base = self.label.replace(":", "")
        return f"{base}-{self.slot}" if self.slot else base


def cuda_device_count() -> int:
    """GPUs visible to this host. Asks in a child process, so this one never touches CUDA."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return 0


MAX_AUTO_CPU_WORKERS = 4


def cpu_workers(n: int | None = None) -> list[DeviceSpec]:
    """``n`` CPU worker processes sharing the cores between them. Default: one per core, up
    to 4 (then several torch threads each). Several single-threaded processes beat one
    multi-threaded one here: decoding the next batch then never stalls the forward pass's
    threads (measured: README, Performance)."""
    cores = os.cpu_count() or 1
    if n is None:
        n = min(cores, MAX_AUTO_CPU_WORKERS)
    if n < 1:
        raise ConfigError(f"--cpu-workers must be at least 1, got {n}")
    threads = None if n == 1 else max(1, cores // n)
    return [DeviceSpec("cpu", None, slot=i, threads=threads) for i in range(n)]


def parse_devices(spec: str, *, cpu: int | None = None) -> list[DeviceSpec]:
    """``auto`` (every GPU, else the CPU), ``cpu``, or GPU indices such as ``0,2``; ``cpu``
    worker processes when the CPU is used (default: see ``cpu_workers``)."""
    spec = spec.strip().lower()
    if spec == "auto":
        n = cuda_device_count()
        return [DeviceSpec(f"cuda:{i}", str(i)) for i in range(n)] or cpu_workers(cpu)
    if spec == "cpu":
        return cpu_workers(cpu)
    devices = []
    for part in spec.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise ConfigError(f"--devices: {spec!r} is not auto, cpu, or GPU indices like 0,1")
        devices.append(DeviceSpec(f"cuda:{int(part)}", str(int(part))))
    if len({d.label for d in devices}) != len(devices):
        raise ConfigError(f"--devices: {spec!r} names a GPU twice")
    return devices


@dataclass
class _Child:
    device: DeviceSpec
    process: subprocess.Popen[bytes]
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    restart_at: float | None = None


class Supervisor:
    """Start, watch and stop one device worker per device."""

    def __init__(
        self, devices: list[DeviceSpec], *, settings: Settings, log_dir: Path | None = None
    ) -> None:
        """``log_dir``: write each worker's output to ``worker-<device>.log`` there instead of
        this process's stderr (``pixelmill run`` keeps the terminal for results)."""
        self.devices = devices
        self.log_dir = log_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        self.env.update(settings.to_env())
        self.settings = settings
        self.children: list[_Child] = []
        self.stopping = False
        self.crashes = 0
        self._reconciler: Any = None

    def _spawn(self, device: DeviceSpec) -> subprocess.Popen[bytes]:
        env = dict(self.env)
        if device.visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = device.visible
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "worker.device_main", "--device", device.label,
               "--slot", str(device.slot)]  # fmt: skip
        if device.threads is not None:
            cmd += ["--threads", str(device.threads)]
        gpus = sum(1 for d in self.devices if d.visible is not None)
        if device.visible is not None:
            cmd += ["--gpu-workers", str(gpus)]
        out: Any = sys.stderr
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path(device), "ab")  # noqa: SIM115 - the child owns it
        # Own process group: the supervisor decides when and how its workers stop.
        # stdout goes to stderr too: a worker never writes into a command's results.
        try:
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip
        finally:
            if out is not sys.stderr:
                out.close()
        log.info("started worker for %s (pid %d)", device.label, proc.pid)
        return proc

    def log_path(self, device: DeviceSpec) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"worker-{device.name}.log"

    def start(self) -> Supervisor:
        for device in self.devices:
            self.children.append(_Child(device, self._spawn(device)))
        return self

    @property
    def alive(self) -> int:
        return sum(1 for c in self.children if c.process.poll() is None)

    def poll(self) -> None:
        """Restart crashed workers, with backoff, and run the reconciler when it is due.
        Call it every second or so."""
        self.reconcile()
        now = time.monotonic()
        for child in self.children:
            code = child.process.poll()
            if code is None or self.stopping:
                continue
            if child.restart_at is None:
                if now - child.started > 60:
                    child.restarts = 0
                delay = RESTART_BACKOFF[min(child.restarts, len(RESTART_BACKOFF) - 1)]
                log.warning(
                    "worker for %s exited with %s; restarting in %.0fs",
                    child.device.label, code, delay,
                )  # fmt: skip
                child.restart_at = now + delay
                self.crashes += 1
            elif now >= child.restart_at:
                child.process = self._spawn(child.device)
                child.restarts += 1
                child.started = now
                child.restart_at = None

    def reconcile(self) -> int:
        """Enqueue again the jobs whose holder is gone (``worker.reconciler``)."""
        if self._reconciler is None:
            from db.engine import make_engine, make_sessionmaker
            from db.migrate import upgrade
            from worker.app import create_app
            from worker.reconciler import Reconciler

            try:
                engine = make_engine(self.settings.resolved_database_url())
                upgrade(engine)
            except Exception:  # noqa: BLE001 - the database away: try again next poll
                log.warning("reconciler cannot reach the database yet", exc_info=True)
                return 0
            self._reconciler = Reconciler(
                self.settings, make_sessionmaker(engine), create_app(self.settings)
            )
        return int(self._reconciler.maybe_run())

    def stop(self, timeout: float = 120.0) -> None:
        """Warm shutdown: SIGTERM lets each worker finish its current batch (unstarted ones go
        back to the queue); whoever is still there after ``timeout`` is killed."""
        self.stopping = True
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker for %s did not stop in time; killing", child.device.label)
                child.process.kill()
                child.process.wait()

    def run_forever(self) -> None:
        """Supervise until SIGTERM or SIGINT, then drain."""
        received: list[int] = []

        def handler(signum: int, _frame: object) -> None:
            received.append(signum)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not received:
                self.poll()
                time.sleep(0.5)
            log.info("stopping workers (signal %d)", received[0])
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)
