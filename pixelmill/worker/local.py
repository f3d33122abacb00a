"""Local services for ``pixelmill run`` and scripts: the embedded broker (when no broker is
configured) and device workers on this host, stopped again on exit."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from pixelmill.settings import Settings
from pixelmill.worker.devices import DeviceSpec, parse_devices
from pixelmill.worker.embedded import EmbeddedRedis
from pixelmill.worker.supervisor import Supervisor

log = logging.getLogger(__name__)


@contextlib.contextmanager
def embedded_broker(settings: Settings) -> Iterator[EmbeddedRedis | None]:
    """Use the embedded Redis when no broker is configured: join the one serving the data dir,
    or start it; leave it on exit (it stops once no pixelmill process uses it)."""
    if not settings.embedded_broker:
        yield None
        return
    redis = EmbeddedRedis(settings.embedded_socket, settings.data_dir).start()
    try:
        yield redis
    finally:
        redis.stop()


def _started(
    settings: Settings,
    devices: str | list[DeviceSpec],
    log_dir: Path | None,
    broker: EmbeddedRedis | None,
) -> Supervisor:
    specs = parse_devices(devices) if isinstance(devices, str) else devices
    return Supervisor(specs, settings=settings, log_dir=log_dir, broker=broker).start()


@contextlib.contextmanager
def local_workers(
    settings: Settings,
    devices: str | list[DeviceSpec] = "auto",
    *,
    drain_timeout: float = 120,
    log_dir: Path | None = None,
    broker: EmbeddedRedis | None = None,
) -> Iterator[Supervisor]:
    supervisor = _started(settings, devices, log_dir, broker)
    try:
        yield supervisor
    finally:
        supervisor.stop(timeout=drain_timeout)


@contextlib.contextmanager
def local_cluster(
    settings: Settings,
    devices: str | list[DeviceSpec] = "auto",
    *,
    workers: bool = True,
    log_dir: Path | None = None,
) -> Iterator[Supervisor | None]:
    """Embedded broker if needed, plus one worker per device unless ``workers`` is False, all
    stopped on exit (the workers drain).

    The workers write to ``log_dir`` (default: ``DATA_DIR/logs``, as for `pixelmill run`), so
    a script's own stderr stays its own. A thread watches them as `pixelmill run` does:
    a crashed worker is restarted, the embedded broker brought back; a worker that cannot
    start at all is logged once (ERROR, with its log's path) on the ``pixelmill`` logger."""
    log_dir = log_dir if log_dir is not None else settings.data_dir / "logs"
    with embedded_broker(settings) as broker:
        if not workers:
            yield None
            return
        supervisor = _started(settings, devices, log_dir, broker)
        with _watched(supervisor):
            yield supervisor


@contextlib.contextmanager
def _watched(
    supervisor: Supervisor, interval: float = 1.0, drain_timeout: float = 120
) -> Iterator[None]:
    """``supervisor.poll()`` every ``interval`` seconds from a thread until the block ends;
    then the same thread stops the workers (they drain for at most ``drain_timeout``).

    The thread that restarts a worker must outlive it: the parent-death signal a worker asks
    for comes when the *thread* that started it ends, not the process. Ending the watch first
    sent every worker it had restarted a SIGTERM of its own, before the drain's."""
    stop = threading.Event()

    def watch() -> None:
        told = False
        try:
            while not stop.wait(interval):
                try:
                    supervisor.poll()
                except Exception:  # noqa: BLE001 - the watch goes on; the next poll may succeed
                    log.exception("pixelmill: watching the local workers failed")
                why = supervisor.failing_to_start
                if why is not None and not told:
                    log.error("pixelmill: %s", why)
                    told = True
        finally:
            supervisor.stop(timeout=drain_timeout)

    thread = threading.Thread(target=watch, name="pixelmill-local-cluster", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
