"""Leases are renewed for work in progress, not for whatever a process holds.

A batch registers the jobs it claimed (``InProgress.track``) and always unregisters them when it
ends, however it ends. While it runs it stamps progress at each stage boundary (an item
decoded, a forward pass, an artifact stored, a retry of a transient error). The heartbeat
renews the leases of the jobs of tracked batches that made progress within the stall bound
(``PIXELMILL_STALL_SECONDS``); a job this process holds but no batch works on, or a batch that
stopped making progress (a hung device, a deadlock), is not renewed: its lease lapses and the
reconciler enqueues the job again.

Each beat also writes the process's own row in the workers table (``Reporter``: state, the
batch on its device, models loaded, items per minute, device memory and utilisation), read by
the dashboard and the metrics. A report that fails is logged and tried again at the next beat;
it never touches the work.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("pixelmill.worker")


class Tracked:
    """One batch in progress: its claimed job ids and when it last made progress."""

    def __init__(self, job_ids: Sequence[str], batch_id: str | None = None) -> None:
        self.job_ids = list(job_ids)
        self.batch_id = batch_id  # the pixelmill batch its jobs belong to (the first's)
        self.last_progress = time.monotonic()

    def touch(self) -> None:
        """The batch made progress (monotonic clock; a plain store, safe from any thread)."""
        self.last_progress = time.monotonic()


class InProgress:
    """The batches a process is working on, for its heartbeat."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[int, Tracked] = {}
        self._ids = itertools.count()

    @contextlib.contextmanager
    def track(self, job_ids: Sequence[str], batch_id: str | None = None) -> Iterator[Tracked]:
        """Track ``job_ids`` for the duration of the block; untracked however it ends."""
        tracked = Tracked(job_ids, batch_id)
        key = next(self._ids)
        with self._lock:
            self._batches[key] = tracked
        try:
            yield tracked
        finally:
            with self._lock:
                self._batches.pop(key, None)

    def job_ids(self, stall: float | None = None) -> list[str]:
        """The job ids of the tracked batches; with ``stall``, only of those that made
        progress within the last ``stall`` seconds."""
        now = time.monotonic()
        with self._lock:
            batches = list(self._batches.values())
        ids: list[str] = []
        for batch in batches:
            if stall is not None and now - batch.last_progress > stall:
                continue
            ids.extend(batch.job_ids)
        return ids

    def stalled(self, stall: float) -> int:
        """How many tracked batches made no progress for longer than ``stall`` seconds."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for b in self._batches.values() if now - b.last_progress > stall)

    def batch_ids(self) -> list[str]:
        """The batches of the messages in progress, oldest message first."""
        with self._lock:
            return [b.batch_id for _, b in sorted(self._batches.items()) if b.batch_id]


RECENT_MINUTES = 30


class Activity:
    """Items this process finished: in all, and per minute over the last ``RECENT_MINUTES``
    (in memory; the heartbeat reports them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items = 0
        self._minutes: dict[int, int] = {}

    def finished(self, n: int, now: float | None = None) -> None:
        if n <= 0:
            return
        minute = int((time.time() if now is None else now) // 60)
        with self._lock:
            self.items += n
            self._minutes[minute] = self._minutes.get(minute, 0) + n
            for old in [m for m in self._minutes if m <= minute - RECENT_MINUTES]:
                del self._minutes[old]

    def snapshot(self, now: float | None = None) -> tuple[int, tuple[tuple[int, int], ...]]:
        """Items in all, and (unix minute, items finished in it) for the last minutes with
        any, oldest first."""
        since = int((time.time() if now is None else now) // 60) - RECENT_MINUTES
        with self._lock:
            return self.items, tuple(sorted((m, n) for m, n in self._minutes.items() if m > since))


class Reporter:
    """Writes this device worker process's row in the workers table (``pixelmill.db.fleet``):
    at start (starting), at each heartbeat (idle or busy) and at shutdown (stopping, stopped).

    ``ctx`` is the process's ``WorkerContext``: its sessions, batches in progress, activity,
    model cache. ``device`` is the device as this process addresses it (``cuda:0`` when pinned
    to one GPU); ``label`` as results show it (``cuda:N``)."""

    def __init__(self, ctx: Any, *, name: str, label: str, device: str) -> None:
        self.ctx = ctx
        self.name = name
        self.label = label
        self.device = device
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = datetime.now(UTC)
        self.state = "starting"  # until the worker consumes; then idle/busy; at the end stopping
        self._gpu = GpuUtilization(label) if label.startswith("cuda") else None

    def report(self, state: str | None = None) -> None:
        """Write the row now (``state``: from now on, unless it is idle or busy, which the
        batches in progress decide)."""
        from pixelmill.db.fleet import report_worker
        from pixelmill.db.records import WorkerReport

        if state is not None:
            self.state = state
        batches = self.ctx.progress.batch_ids()
        holder = self.ctx.device_holder
        current = holder.batch_id if holder is not None and holder.batch_id else None
        state = self.state
        if state in ("idle", "busy"):
            state = "busy" if batches else "idle"
        used, total = device_memory(self.device)
        items, recent = self.ctx.activity.snapshot()
        row = WorkerReport(
            name=self.name,
            host=self.host,
            device=self.label,
            pid=self.pid,
            state=state,
            models=tuple(self.ctx.cache.loaded()),
            batch_id=current or (batches[0] if batches else None),
            items=items,
            recent=recent,
            memory_used=used,
            memory_total=total,
            utilization=self._gpu.read() if self._gpu is not None else None,
            started_at=self.started_at,
        )
        with self.ctx.sessions.begin() as session:
            report_worker(session, row)

    def try_report(self, state: str | None = None) -> bool:
        """``report``, logging instead of raising: the work never waits on it."""
        try:
            self.report(state)
            return True
        except Exception:  # noqa: BLE001 - the database away: the next beat tries again
            log.warning("cannot write this worker's report (workers table)", exc_info=True)
            return False


def device_memory(device: str) -> tuple[int | None, int | None]:
    """Bytes of GPU memory this process's tensors hold, and the GPU's total: from torch, only
    when this process has torch and has started CUDA already (never imports nor starts it)."""
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda"):
        return None, None
    try:
        if not torch.cuda.is_initialized():
            return None, None
        used = int(torch.cuda.memory_allocated(device))
        total = int(torch.cuda.get_device_properties(device).total_memory)
    except Exception:  # noqa: BLE001 - a report without it
        log.debug("cannot read device memory", exc_info=True)
        return None, None
    return used, total


class GpuUtilization:
    """The GPU's busy fraction (0..1) from NVML, when ``pynvml`` (nvidia-ml-py) is installed
    and the GPU is there; None otherwise. NVML numbers GPUs by PCI bus, which CUDA's order
    need not follow: the handle is found by the PCI address torch reports for this process's
    device, else by the physical index in the label (``cuda:N``)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._nvml: Any = None
        self._handle: Any = None
        self._tried = False

    def _open(self) -> None:
        self._tried = True
        try:
            import pynvml  # nvidia-ml-py: optional
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            handle = None
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_initialized():
                p = torch.cuda.get_device_properties(0)
                bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
                with contextlib.suppress(Exception):
                    handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            if handle is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(self.label.partition(":")[2]))
        except Exception:  # noqa: BLE001 - no driver, no such GPU: no utilisation
            log.info("GPU utilisation unavailable for %s (NVML)", self.label, exc_info=True)
            return
        self._nvml, self._handle = pynvml, handle

    def read(self) -> float | None:
        if not self._tried:
            # After CUDA started, so that the PCI address is known; until then, try again.
            torch = sys.modules.get("torch")
            if torch is not None and not torch.cuda.is_initialized():
                return None
            self._open()
        if self._handle is None:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu) / 100.0
        except Exception:  # noqa: BLE001
            log.debug("NVML utilisation read failed", exc_info=True)
            return None


class Heartbeat(threading.Thread):
    """Renews, every ``every`` seconds, the leases of the jobs of this process's batches that
    are making progress (``ctx.progress``, ``ctx.stall``), and nothing else; then writes the
    process's report (``reporter``), if it has one."""

    def __init__(self, ctx: Any, every: float, reporter: Reporter | None = None) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.ctx = ctx
        self.every = every
        self.reporter = reporter
        self._halt = threading.Event()
        self._warned_stalled = 0

    def beat(self) -> int:
        """One renewal; returns the number of leases renewed."""
        from pixelmill.db.jobs import renew_leases

        ids = self.ctx.progress.job_ids(stall=self.ctx.stall)
        stalled = self.ctx.progress.stalled(self.ctx.stall)
        if stalled > self._warned_stalled:
            log.warning(
                "%d batch(es) made no progress for %gs (PIXELMILL_STALL_SECONDS): their leases "
                "are no longer renewed, so the reconciler takes their jobs back",
                stalled, self.ctx.stall,
            )  # fmt: skip
        self._warned_stalled = stalled
        if not ids:
            return 0
        with self.ctx.sessions.begin() as session:
            return renew_leases(session, ids, worker=self.ctx.worker_name, lease=self.ctx.lease)

    def run(self) -> None:
        while not self._halt.wait(self.every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the database away: the next beat tries again
                log.warning("heartbeat failed", exc_info=True)
            if self.reporter is not None:
                self.reporter.try_report()

    def stop(self) -> None:
        self._halt.set()
