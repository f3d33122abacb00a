"""Local services for ``pixelmill run`` and scripts: the embedded broker (when no broker is
configured) and device workers on this host, stopped again on exit."""

from __future__ import annotations

import contextlib
import logging
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
    """Embedded broker if needed, plus one worker per device unless ``workers`` is False."""
    with embedded_broker(settings) as broker:
        if not workers:
            yield None
            return
        with local_workers(settings, devices, log_dir=log_dir, broker=broker) as supervisor:
            yield supervisor
