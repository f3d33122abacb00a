"""Helpers shared by the command modules: settings loading and error-to-exit-status mapping."""

from __future__ import annotations

import contextlib
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
from pixelmill.settings import Settings, load_settings

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVICE = 3
EXIT_INTERRUPTED = 130


def fail(message: str, code: int) -> None:
    click.echo(f"pixelmill: {message}", err=True)
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
