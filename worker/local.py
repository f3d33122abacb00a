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


@contextlib.contextmanager
def local_workers(
    settings: Settings,
    devices: str | list[DeviceSpec] = "auto",
    *,
    drain_timeout: float = 120,
    log_dir: Path | None = None,
    broker: EmbeddedRedis | None = None,
) -> Iterator[Supervisor]:
    specs = parse_devices(devices) if isinstance(devices, str) else devices
    supervisor = Supervisor(specs, settings=settings, log_dir=log_dir, broker=broker).start()
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
        with (
            local_workers(settings, devices, log_dir=log_dir, broker=broker) as supervisor,
            _watched(supervisor),
        ):
            yield supervisor


@contextlib.contextmanager
def _watched(supervisor: Supervisor, interval: float = 1.0) -> Iterator[None]:
    """``supervisor.poll()`` every ``interval`` seconds from a thread, until the block ends."""
    stop = threading.Event()

    def watch() -> None:
        told = False
        while not stop.wait(interval):
            try:
                supervisor.poll()
            except Exception:  # noqa: BLE001 - the watch goes on; the next poll may succeed
                log.exception("pixelmill: watching the local workers failed")
            why = supervisor.failing_to_start
            if why is not None and not told:
                log.error("pixelmill: %s", why)
                told = True

    thread = threading.Thread(target=watch, name="pixelmill-local-cluster", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
