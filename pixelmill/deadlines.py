"""Thread pools whose tasks may have a deadline: a worker's decode pool (read, decode and
preprocess inputs, store artifacts) and a producer's hashing of new files.

A read can hang for good (a dead NFS mount, a FIFO: even ``stat`` may block, in the kernel,
where no Python code can interrupt it). A task still running past its deadline is abandoned:
its future fails with ``DeadlineExceeded`` at once, its thread is written off (it exits if its
call ever returns) and a fresh thread takes its place, so stuck threads never exhaust the
pool. The threads are daemons: a thread stuck in the kernel never blocks the process's exit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Threads written off and still stuck, past which no more are started: something is badly
# wrong with the file system, and the batches stall (and lose their leases) instead.
MAX_ABANDONED = 256


class DeadlineExceeded(Exception):
    """A task ran past its deadline; its thread was abandoned."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"took longer than {seconds:g} s")
        self.seconds = seconds


@dataclass(eq=False)
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    deadline: float | None
    future: Future[Any] = field(default_factory=Future)
    started: float | None = None


class _Worker(threading.Thread):
    def __init__(self, pool: DecodePool, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.pool = pool
        self.task: _Task | None = None
        self.abandoned = False

    def run(self) -> None:
        pool = self.pool
        while True:
            task = pool._queue.get()
            if task is None:
                return
            if not task.future.set_running_or_notify_cancel():
                continue
            with pool._cond:
                task.started = time.monotonic()
                self.task = task
                pool._cond.notify_all()
            try:
                result = task.fn(*task.args)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                _settle(task.future, exc=exc)
            else:
                _settle(task.future, result=result)
            with pool._cond:
                self.task = None
                if self.abandoned:  # replaced long ago: this thread is surplus now
                    pool._stuck -= 1
                    return


def _settle(future: Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    try:  # an abandoned task's future already holds DeadlineExceeded
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class DecodePool:
    """``threads`` worker threads; ``submit(fn, *args, deadline=s)``."""

    def __init__(self, threads: int, *, name: str = "decode") -> None:
        self.threads = max(1, threads)
        self.name = name
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._workers: list[_Worker] = []
        self._stuck = 0  # abandoned threads still inside their call
        self._started = 0
        self._closed = False
        self._watchdog: threading.Thread | None = None
        self.abandoned = 0  # threads abandoned so far (for logs and tests)

    def submit(
        self, fn: Callable[..., Any], *args: Any, deadline: float | None = None
    ) -> Future[Any]:
        task = _Task(fn, args, deadline)
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode pool is shut down")
            if not self._started:
                for _ in range(self.threads):
                    self._spawn()
            if deadline is not None and self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name=f"{self.name}-watchdog", daemon=True
                )
                self._watchdog.start()
        self._queue.put(task)
        return task.future

    def _spawn(self) -> None:
        self._started += 1
        worker = _Worker(self, f"{self.name}_{self._started}")
        self._workers.append(worker)
        worker.start()

    def _watch(self) -> None:
        """Abandon the tasks running past their deadline, each thread replaced by a new one."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                soonest: float | None = None
                for worker in list(self._workers):
                    task = worker.task
                    if task is None or task.deadline is None or task.started is None:
                        continue
                    ends = task.started + task.deadline
                    if ends <= now:
                        self._abandon(worker, task)
                    elif soonest is None or ends < soonest:
                        soonest = ends
                self._cond.wait(None if soonest is None else max(0.01, soonest - now))

    def _abandon(self, worker: _Worker, task: _Task) -> None:
        assert task.deadline is not None
        worker.abandoned = True
        self._workers.remove(worker)
        self._stuck += 1
        self.abandoned += 1
        _settle(task.future, exc=DeadlineExceeded(task.deadline))
        if self._stuck <= MAX_ABANDONED:
            self._spawn()
            log.warning(
                "%s: a task ran past its %gs deadline; its thread is abandoned and replaced "
                "(%d stuck so far)", self.name, task.deadline, self._stuck,
            )  # fmt: skip
        else:
            log.error(
                "%s: %d threads are stuck (a hung file system?); not starting more",
                self.name, self._stuck,
            )  # fmt: skip

    def shutdown(self, wait: bool = True, timeout: float = 30) -> None:
        """Stop the threads (after the tasks already queued); stuck ones are left behind."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
            self._cond.notify_all()
        for _ in workers:
            self._queue.put(None)
        if wait:
            ends = time.monotonic() + timeout
            for worker in workers:
                worker.join(max(0.0, ends - time.monotonic()))
