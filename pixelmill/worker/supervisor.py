"""The device supervisor: one worker process per device, restarted when it crashes, drained on
SIGTERM. Processes are started fresh (``subprocess``), so CUDA is never inherited by a fork."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixelmill.errors import ServiceUnavailable
from pixelmill.settings import ENV_PREFIX, Settings
from pixelmill.stopping import StalledOutput
from pixelmill.worker.devices import DeviceSpec
from pixelmill.worker.embedded import EmbeddedRedis
from pixelmill.worker.lifecycle import (
    DRAIN_SECONDS,
    DeviceBusy,
    DeviceLock,
    default_lock_dir,
    python_command,
)

log = logging.getLogger(__name__)

RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class _Child:
    device: DeviceSpec
    process: subprocess.Popen[bytes] | None = None  # None: not started (its device is busy)
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    restart_at: float | None = None
    ready_file: Path | None = None
    start_failures: int = 0  # exits in a row before the worker ever consumed a message
    busy_logged: str | None = None


MAX_START_FAILURES = 5
BROKER_CHECK_INTERVAL = 2.0


class Supervisor:
    """Start, watch and stop one device worker per device.

    Each worker holds its device's lock (``pixelmill.worker.lifecycle.DeviceLock``: GPUs per
    host, CPU slots per data dir) for its whole life, so a second supervisor on the host waits
    for the device instead of putting a second worker on it; each worker dies with this process
    (the parent-death signal, and a watch in the worker)."""

    def __init__(
        self,
        devices: list[DeviceSpec],
        *,
        settings: Settings,
        log_dir: Path | None = None,
        broker: EmbeddedRedis | None = None,
    ) -> None:
        """``log_dir``: write each worker's output to ``worker-<device>.log`` there instead of
        this process's stderr (``pixelmill run`` keeps the terminal for results). ``broker``:
        the embedded broker the workers use, brought back if it vanishes."""
        self.devices = devices
        self.broker = broker
        self.broker_down_since: float | None = None
        self._broker_check = 0.0
        self.log_dir = log_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        self.env.update(settings.to_env())
        self.settings = settings
        self.children: list[_Child] = []
        self.stopping = False
        self.crashes = 0
        self._reconciler: Any = None
        # Each worker touches its ready file once it consumes; fixed names in the data dir
        # (one worker per device slot there), so nothing piles up when a supervisor is killed.
        self._state = settings.data_dir / "workers"

    def lock_path(self, device: DeviceSpec) -> Path:
        if device.visible is not None:  # a GPU: one worker per host, whoever started it
            return default_lock_dir() / f"{device.name}.lock"
        return self.settings.data_dir / "locks" / f"{device.name}.lock"

    def _spawn(self, child: _Child) -> bool:
        """Start the child's worker if its device is free; False if another process has it."""
        device = child.device
        try:
            lock = DeviceLock(self.lock_path(device)).acquire()
        except DeviceBusy as busy:
            if child.busy_logged != busy.holder:
                log.warning(
                    "%s already has a worker (%s, lock %s); waiting for it to stop",
                    device.name, busy.holder or "another process", busy.path,
                )  # fmt: skip
                child.busy_logged = busy.holder
            return False
        child.busy_logged = None
        try:
            self._state.mkdir(parents=True, exist_ok=True)
            child.ready_file = self._state / f"{device.name}.ready"
            child.ready_file.unlink(missing_ok=True)
            child.process = self._popen(device, lock, child.ready_file)
            lock.record(f"pixelmill worker pid {child.process.pid} ({device.name})")
        finally:
            lock.release()  # the worker keeps the lock through its inherited descriptor
        child.started = time.monotonic()
        return True

    def _popen(
        self, device: DeviceSpec, lock: DeviceLock, ready_file: Path
    ) -> subprocess.Popen[bytes]:
        env = dict(self.env)
        if device.visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = device.visible
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = python_command("-m", "pixelmill.worker.device_main", "--device", device.label,
                             "--slot", str(device.slot), "--parent", str(os.getpid()),
                             "--ready-file", str(ready_file))  # fmt: skip
        if device.threads is not None:
            cmd += ["--threads", str(device.threads)]
        gpus = sum(1 for d in self.devices if d.visible is not None)
        if device.visible is not None:
            cmd += ["--gpu-workers", str(gpus)]
        out: Any = sys.stderr
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path(device), "ab")  # noqa: SIM115 - the child owns it
        # Own session: the supervisor decides when and how its workers stop (a Ctrl-C in the
        # terminal reaches only the supervisor, which drains them). They die with it anyway:
        # the worker sets the parent-death signal and watches its parent.
        # stdout goes to stderr too: a worker never writes into a command's results.
        assert lock.fd is not None
        try:
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, pass_fds=(lock.fd,),
            )  # fmt: skip
        finally:
            if out is not sys.stderr:
                out.close()
        log.info("started worker %s on %s (pid %d)", device.name, device.label, proc.pid)
        return proc

    def log_path(self, device: DeviceSpec) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"worker-{device.name}.log"

    def start(self) -> Supervisor:
        for device in self.devices:
            child = _Child(device)
            self._spawn(child)
            self.children.append(child)
        return self

    @property
    def alive(self) -> int:
        return sum(1 for c in self.children if c.process is not None and c.process.poll() is None)

    @property
    def failing_to_start(self) -> str | None:
        """Why the workers cannot start, once one has exited MAX_START_FAILURES times in a row
        before consuming anything (a broken install, a bad setting); else None."""
        for child in self.children:
            if child.start_failures >= MAX_START_FAILURES:
                where = f"; its log: {self.log_path(child.device)}" if self.log_dir else ""
                return (
                    f"the worker {child.device.name} exited {child.start_failures} times "
                    f"in a row before it could take any work{where}"
                )
        return None

    def poll(self) -> None:
        """Restart crashed workers, with backoff, and run the reconciler when it is due.
        Call it every second or so."""
        now = time.monotonic()
        self.watch_broker(now)
        self.reconcile()
        for child in self.children:
            if self.stopping:
                break
            if child.process is None:  # its device was busy: try again
                if now >= (child.restart_at or 0) and self._spawn(child):
                    child.restart_at = None
                continue
            code = child.process.poll()
            if code is None:
                continue
            if child.restart_at is None:
                ready = child.ready_file is not None and child.ready_file.exists()
                child.start_failures = 0 if ready else child.start_failures + 1
                if now - child.started > 60:
                    child.restarts = 0
                delay = RESTART_BACKOFF[min(child.restarts, len(RESTART_BACKOFF) - 1)]
                log.warning(
                    "worker %s exited with %s; restarting in %.0fs",
                    child.device.name, code, delay,
                )  # fmt: skip
                child.restart_at = now + delay
                self.crashes += 1
            elif now >= child.restart_at:
                child.process = None
                child.restarts += 1
                if self._spawn(child):
                    child.restart_at = None

    def watch_broker(self, now: float) -> None:
        """Bring the embedded broker back if it vanished (its keeper was killed); notes since
        when it has been unreachable (``broker_down_since``)."""
        if self.broker is None or now < self._broker_check:
            return
        self._broker_check = now + BROKER_CHECK_INTERVAL
        try:
            self.broker.ensure(timeout=10)
        except ServiceUnavailable as exc:
            self.broker_down_since = self.broker_down_since or now
            log.warning("%s", exc)
        else:
            if self.broker_down_since is not None:
                log.warning("the embedded broker is back")
            self.broker_down_since = None

    def reconcile(self) -> int:
        """Enqueue again the jobs whose holder is gone (``pixelmill.worker.reconciler``)."""
        if self._reconciler is None:
            from pixelmill.db.engine import configured_database
            from pixelmill.wire import create_app
            from pixelmill.worker.reconciler import Reconciler

            try:
                database = configured_database(self.settings)
            except Exception:  # noqa: BLE001 - the database away: try again next poll
                log.warning("reconciler cannot reach the database yet", exc_info=True)
                return 0
            self._reconciler = Reconciler(
                self.settings, database.sessions, create_app(self.settings)
            )
        return int(self._reconciler.maybe_run())

    def stop(self, timeout: float = DRAIN_SECONDS) -> None:
        """Warm shutdown: SIGTERM lets each worker finish its current batch (unstarted ones go
        back to the queue); whoever is still there after ``timeout`` is killed."""
        self.stopping = True
        running = [c for c in self.children if c.process is not None]
        for child in running:
            assert child.process is not None
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                where = (
                    f" (its threads' stacks: {self.log_path(child.device)})" if self.log_dir else ""
                )
                log.warning("worker %s did not stop in time; killing%s", child.device.name, where)
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # stacks, to its log
                    child.process.send_signal(signal.SIGUSR2)
                    child.process.wait(1)
                child.process.kill()
                child.process.wait()
        for child in running:
            if child.ready_file is not None:
                child.ready_file.unlink(missing_ok=True)

    def run_forever(self) -> None:
        """Supervise until SIGTERM or SIGINT, then drain."""
        received: list[int] = []
        stalled = StalledOutput()  # the drain never waits on a terminal (or pipe) no one reads
        stalled.start()

        def handler(signum: int, _frame: object) -> None:
            received.append(signum)
            if len(received) == 1:  # not again from a second signal that interrupts arm()
                stalled.arm()

        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {s: signal.signal(s, handler) for s in stops}
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
