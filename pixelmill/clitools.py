"""Helpers shared by the command modules: settings loading and error-to-exit-status mapping."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

import click

from pixelmill.errors import (
    BadInput,
    ConfigError,
    ModelUnavailable,
    PixelmillError,
    ServiceUnavailable,
    UnknownBatch,
)
from pixelmill.settings import Settings, load_settings, mask_secrets

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVICE = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C); SIGTERM gives 143 and SIGHUP 129 (128 + signal)


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


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP (``timeout``, ``systemctl stop``, a cancelled CI job,
    a closed SSH session) raise ``Stopped`` in the main thread. Later ones are ignored while
    the command stops what it started (SIGINT still interrupts at once)."""
    received: list[int] = []
    terminal = _terminal_fds()

    def handler(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            _detach_from_terminal(terminal)
        if received:
            return
        received.append(signum)
        raise Stopped(signum)

    watched = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, handler) for s in watched}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def fail(message: str, code: int) -> None:
    click.echo(f"pixelmill: {mask_secrets(message)}", err=True)  # no URL's password shown
    sys.exit(code)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
        raise  # unreachable


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn pixelmill's errors into one clear line and the documented exit status."""
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except (ConfigError, BadInput, ModelUnavailable, UnknownBatch) as exc:
        fail(str(exc), EXIT_USAGE)
    except ServiceUnavailable as exc:
        fail(str(exc), EXIT_SERVICE)
    except OperationalError as exc:
        fail(f"cannot reach the database: {str(exc.orig).strip()}", EXIT_SERVICE)
    except PixelmillError as exc:
        fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except Stopped as exc:
        fail(f"stopped by {exc}", exc.exit_status)
