"""Leases are renewed for work in progress, not for whatever a process holds.

A batch registers the jobs it claimed (``InProgress.track``) and always unregisters them when it
ends, however it ends. While it runs it stamps progress at each stage boundary (an item
decoded, a forward pass, an artifact stored, a retry of a transient error). The heartbeat
renews the leases of the jobs of tracked batches that made progress within the stall bound
(``PIXELMILL_STALL_SECONDS``); a job this process holds but no batch works on, or a batch that
stopped making progress (a hung device, a deadlock), is not renewed: its lease lapses and the
reconciler enqueues the job again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger("pixelmill.worker")


class Tracked:
    """One batch in progress: its claimed job ids and when it last made progress."""

    def __init__(self, job_ids: Sequence[str]) -> None:
        self.job_ids = list(job_ids)
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
    def track(self, job_ids: Sequence[str]) -> Iterator[Tracked]:
        """Track ``job_ids`` for the duration of the block; untracked however it ends."""
        tracked = Tracked(job_ids)
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


class Heartbeat(threading.Thread):
    """Renews, every ``every`` seconds, the leases of the jobs of this process's batches that
    are making progress (``ctx.progress``, ``ctx.stall``), and nothing else."""

    def __init__(self, ctx: Any, every: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.ctx = ctx
        self.every = every
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

    def stop(self) -> None:
        self._halt.set()
