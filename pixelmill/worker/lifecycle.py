"""Processes that die with their parent, and devices that take one worker each.

- ``set_parent_death_signal``: Linux's PR_SET_PDEATHSIG, so the kernel signals a child the
  moment its parent dies (SIGKILL included).
- ``ParentWatch``: the portable fallback, in the child: when the parent is gone (the child was
  reparented), drain, and exit for good after a deadline.
- ``DeviceLock``: one worker per device per host. A supervisor takes the device's lock before
  starting its worker and hands it to the worker process (an inherited file descriptor), so
  the lock lives exactly as long as that worker; a second supervisor on the same host waits.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# How long a worker may take to finish its running batch once told to stop (or orphaned)
# before it is killed (by its supervisor) or exits (on its own, when the supervisor is gone).
DRAIN_SECONDS = 120.0


def python_command(*args: str) -> list[str]:
    """This Python with ``args``, never importing from the folder it runs in. ``-m`` would put
    the current folder first on ``sys.path``, so a user's own ``pixelmill.py``, ``celery.py`` or
    ``redis.py`` there would replace the real ones in every process pixelmill starts; ``-P``
    (Python 3.11) leaves it out."""
    return [sys.executable, "-P", *args]


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies. Linux only; True
    if set. (Safe in a ``preexec_fn``: one system call, no allocation in Python objects that
    a lock could guard.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


class ParentWatch(threading.Thread):
    """Watches the parent process; when it is gone, ``on_orphan`` is called once (e.g. to start
    a warm shutdown), and the process exits (status 1) ``deadline`` seconds later if it is still
    there."""

    def __init__(
        self,
        parent: int,
        *,
        on_orphan: Callable[[], object] | None = None,
        deadline: float = 60.0,
        every: float = 0.5,
    ) -> None:
        super().__init__(name="parent-watch", daemon=True)
        self.parent = parent
        self.on_orphan = on_orphan
        self.deadline = deadline
        self.every = every
        self._halt = threading.Event()

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent

    def run(self) -> None:
        while not self._halt.wait(self.every):
            if self.parent_alive():
                continue
            log.warning(
                "parent process %d is gone; draining, then exiting within %.0fs",
                self.parent, self.deadline,
            )  # fmt: skip
            if self.on_orphan is not None:
                self.on_orphan()
            if not self._halt.wait(self.deadline):
                log.error("still running %.0fs after the parent died; exiting", self.deadline)
                os._exit(1)
            return

    def stop(self) -> None:
        self._halt.set()


def default_lock_dir() -> Path:
    """Where GPU locks live: one folder per host, shared by every user and data dir (two
    workers on one GPU run it out of memory whoever started them)."""
    return Path(tempfile.gettempdir()) / "pixelmill-devices"


class DeviceBusy(Exception):
    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path = path
        self.holder = holder


class DeviceLock:
    """An exclusive lock on ``path`` (flock), taken without waiting."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> DeviceLock:
        """Take the lock, or raise DeviceBusy naming its holder."""
        shared_dir = self.path.parent == default_lock_dir()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if shared_dir:
            with contextlib.suppress(OSError):  # every user of the host may lock GPUs
                os.chmod(self.path.parent, 0o1777)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise DeviceBusy(self.path, holder) from None
        self.fd = fd
        return self

    def record(self, holder: str) -> None:
        """Write who holds it (shown to a supervisor that finds it busy)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, holder.encode(), 0)

    def release(self) -> None:
        """Close this process's descriptor. A worker that inherited it keeps the lock."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
