"""What the commands share: the exit statuses, settings loading, and pixelmill's errors (and a stop
signal) mapped to one clear line and the documented exit status."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import click

from pixelmill.errors import (
    BadInput,
    ConfigError,
    ModelUnavailable,
    PixelmillError,
    ServiceUnavailable,
    UnknownBatch,
)
from pixelmill.stopping import Stopped

# The settings (pydantic) and the database (SQLAlchemy) are imported where a command uses
# them, not here: `pixelmill --version` and `--help` import neither.
if TYPE_CHECKING:
    from pixelmill.producer.client import Client
    from pixelmill.settings import Settings

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVICE = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5  # the batch was cancelled (`pixelmill cancel`): some jobs ended cancelled
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C); SIGTERM gives 143 and SIGHUP 129 (128 + signal)


def write_until_closed(write: Callable[[], tuple[int, int]]) -> tuple[int, int] | None:
    """Run ``write`` (printing to stdout); None if the reader went away (`| head`): stdout then
    goes nowhere, so nothing more fails on it, and the caller decides the exit status."""
    try:
        return write()
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return None


def fail(message: str, code: int) -> None:
    from pixelmill.settings import mask_secrets

    click.echo(f"pixelmill: {mask_secrets(message)}", err=True)  # no URL's password shown
    sys.exit(code)


def settings_or_exit() -> Settings:
    from pixelmill.settings import load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
        raise  # unreachable


def open_client(settings: Settings, *, create: bool = False) -> Client:
    """The Python API's ``Client``, imported when a command runs: SQLAlchemy and the rest of
    the producer are most of a light command's start. ``create=False`` for the commands that
    only read or control a batch (no database made where there is none)."""
    from pixelmill.producer.client import Client

    return Client(settings, create=create)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn pixelmill's errors (a database that cannot be reached among them) into one clear
    line and the documented exit status."""
    from pixelmill.db.engine import database_errors

    try:
        with database_errors():
            yield
    except (ConfigError, BadInput, ModelUnavailable, UnknownBatch) as exc:
        fail(str(exc), EXIT_USAGE)
    except ServiceUnavailable as exc:
        fail(str(exc), EXIT_SERVICE)
    except PixelmillError as exc:
        fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except Stopped as exc:
        fail(f"stopped by {exc}", exc.exit_status)
