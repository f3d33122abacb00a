"""Transient errors retried in place: the database or the object store away is worth trying
again, with capped exponential backoff, for a bounded time; anything else is not. Used by the
batch pipeline (``pixelmill.worker.batching``), so a retry never claims jobs again (attempts
count worker deaths only)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from pixelmill.errors import PixelmillError, StoreError
from pixelmill.worker.heartbeat import Tracked

log = logging.getLogger("pixelmill.worker.batching")  # its messages are the batch's

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 60.0


def is_transient(exc: BaseException) -> bool:
    """The database or the object store away (unreachable, restarting, locked, timing out):
    worth trying again. Anything else (a refused value, a bug) is not."""
    if isinstance(exc, StoreError):
        return exc.transient
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class GaveUp(PixelmillError):
    """A transient error outlasted ``PIXELMILL_TRANSIENT_RETRY_SECONDS``; says which service
    and its last error ("object store: ...", "database: ...")."""

    def __init__(self, exc: BaseException) -> None:
        service = "object store" if isinstance(exc, StoreError) else "database"
        super().__init__(f"{service}: {first_line(exc)}")


class Retrier:
    """Calls retried in place on transient errors, with exponential backoff (0.5 s doubling, at
    most 60 s between tries) until ``window`` seconds of failing in a row; then ``GaveUp``.
    The window is the batch's, shared by its calls (and threads): once it is spent, a call
    that fails gives up at once. Each try stamps the batch's progress, so its leases are kept
    while it waits; nothing is claimed again, so no attempt is counted."""

    def __init__(self, window: float, tracked: Tracked | None = None) -> None:
        self.window = window
        self.tracked = tracked
        self.failing_since: float | None = None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        delay = FIRST_BACKOFF
        while True:
            try:
                result = fn(*args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                if self.failing_since is None:
                    self.failing_since = now
                left = self.failing_since + self.window - now
                if left <= 0:
                    log.error("giving up after %gs of transient errors: %s", self.window, exc)
                    raise GaveUp(exc) from exc
                pause = min(delay, left, MAX_BACKOFF)
                log.warning("transient error (%s); retrying in %.1fs", first_line(exc), pause)
                self._touch()
                time.sleep(pause)
                self._touch()
                delay = min(delay * 2, MAX_BACKOFF)
            else:
                self.failing_since = None
                return result

    def _touch(self) -> None:
        if self.tracked is not None:
            self.tracked.touch()
