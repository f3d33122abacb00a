"""Stopping a process cleanly: SIGTERM and SIGHUP turned into an exception in the main thread
(``stop_signals_raise``), a hung-up terminal detached, and output that no one reads any more
(a frozen SSH session, Ctrl-S) sent to /dev/null so that the stop is never stuck in a
``write()`` (``StalledOutput``). Used by every command that starts something and by the
worker's supervisor."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGHUP) turned into an exception, so that everything a command
    started is stopped on the way out (a BaseException: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _terminal_fds() -> list[int]:
    """The standard streams that are a terminal (checked before a hangup: a hung-up terminal
    no longer says it is one)."""
    fds = []
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                fds.append(fd)
    return fds


def _detach_from_terminal(fds: list[int]) -> None:
    """After a hangup the terminal is gone: writing to it would fail (EIO), so what is still
    printed on the way out goes nowhere instead. Output redirected to a file is kept."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)


STALLED_AFTER = 3.0  # seconds stdout or stderr may take no output at all while stopping


class StalledOutput(threading.Thread):
    """A stop must not wait on a reader: once ``arm()``ed (on a stop signal), stdout or stderr
    that takes no output for ``after`` seconds (a frozen SSH session whose sshd stopped
    reading, a terminal paused with Ctrl-S, a pipe whose reader hangs) is sent to /dev/null,
    and every thread is woken from the write it is blocked in (SIGURG, with a handler,
    interrupts the system call, and Python retries it on the fd, now /dev/null). Without
    this, a write blocked in rich's progress thread held its console lock, and the stop waited
    for it for ever.

    ``start()`` from the main thread, before any stop signal can come (it installs the SIGURG
    handler, and a signal handler must not start a thread: the main thread it interrupted may
    hold threading's own lock); ``arm()`` from the signal handler."""

    def __init__(self, fds: tuple[int, ...] = (1, 2), after: float = STALLED_AFTER) -> None:
        super().__init__(name="stalled-output", daemon=True)
        self.fds = list(fds)
        self.after = after
        self.armed = threading.Event()

    def start(self) -> None:
        signal.signal(signal.SIGURG, lambda *_: None)  # interrupts a blocked write(); no more
        super().start()

    def arm(self) -> None:
        self.armed.set()

    def run(self) -> None:
        self.armed.wait()
        since: dict[int, float] = {}
        while self.fds:
            time.sleep(0.1)
            for fd in list(self.fds):
                try:
                    _, ready, _ = select.select([], [fd], [], 0)
                except (OSError, ValueError):  # closed: nothing will block on it
                    self.fds.remove(fd)
                    continue
                if ready:
                    since.pop(fd, None)
                elif time.monotonic() - since.setdefault(fd, time.monotonic()) >= self.after:
                    self._detach(fd)

    def _detach(self, fd: int) -> None:
        _detach_from_terminal([fd])  # a stalled pipe too: to /dev/null
        self.fds.remove(fd)
        for thread in threading.enumerate():
            if thread is not self and thread.ident is not None:
                with contextlib.suppress(OSError, ProcessLookupError):
                    signal.pthread_kill(thread.ident, signal.SIGURG)


DEFER_AT_MOST = 5.0  # seconds a stop signal may wait for output in progress to be finished


class StopSignals:
    """SIGTERM and SIGHUP as ``Stopped`` (see ``stop_signals_raise``), and ``deferred()``
    stretches in which a stop waits (for at most DEFER_AT_MOST seconds) for the output in
    progress to be written whole."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.terminal = _terminal_fds()
        self._defer = False
        self._pending: int | None = None
        self.stalled = StalledOutput()
        self.stalled.start()

    def handler(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            _detach_from_terminal(self.terminal)
        if signum == signal.SIGALRM:  # a deferred stop waited long enough
            if self._pending is not None:
                pending, self._pending = self._pending, None
                raise Stopped(pending)
            return
        if self.received:
            return
        self.received.append(signum)
        self.stalled.arm()
        if self._defer:
            self._pending = signum
            signal.setitimer(signal.ITIMER_REAL, DEFER_AT_MOST)
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer = True
        try:
            yield
        finally:
            self._defer = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            pending, self._pending = self._pending, None
            if pending is not None:
                raise Stopped(pending)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[StopSignals]:
    """While inside, SIGTERM and SIGHUP (``timeout``, ``systemctl stop``, a cancelled CI job,
    a closed SSH session) raise ``Stopped`` in the main thread. Later ones are ignored while
    the command stops what it started (SIGINT still interrupts at once)."""
    stops = StopSignals()
    watched = (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)
    previous = {s: signal.signal(s, stops.handler) for s in watched}
    try:
        yield stops
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in previous.items():
            signal.signal(s, h)
