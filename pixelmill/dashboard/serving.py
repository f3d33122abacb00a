"""Starting a dashboard: its credentials (from the environment, never the command line), and
the dashboard served in a thread of this process for as long as a block runs (`run
--dashboard`). Light to import: the web server is loaded only when one is started."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import click

from pixelmill.errors import InputError
from pixelmill.settings import Settings

ENV_AUTH = "PIXELMILL_DASHBOARD_BASIC_AUTH"


def dashboard_credentials(address: str) -> list[tuple[str, str]] | None:
    """The credentials from PIXELMILL_DASHBOARD_BASIC_AUTH (never from the command line,
    which `ps` shows); InputError when they are malformed, or missing for a non-loopback
    ``address``."""
    from pixelmill.dashboard.server import is_loopback, parse_credentials

    credentials = parse_credentials(os.environ.get(ENV_AUTH))
    if credentials is None and not is_loopback(address):
        raise InputError(
            f"refusing to listen on a non-loopback address ({address}) without "
            f"authentication: set {ENV_AUTH}=user:password"
        )
    return credentials


@contextlib.contextmanager
def served_dashboard(settings: Settings, enabled: bool, port: int) -> Iterator[str | None]:
    """`run --dashboard`: the dashboard on loopback (PIXELMILL_DASHBOARD_BASIC_AUTH, if set,
    asked for) in a thread of this process, for as long as the block runs; its URL printed on
    stderr. It dies with the run: a thread, nothing left behind."""
    if not enabled:
        yield None
        return
    from pixelmill.dashboard.server import Dashboard

    credentials = dashboard_credentials("127.0.0.1")
    try:
        server = Dashboard(settings, address="127.0.0.1", port=port, credentials=credentials)
    except OSError as exc:
        why = exc.strerror or exc
        raise InputError(f"--dashboard: cannot listen on 127.0.0.1:{port}: {why}") from None
    server.start()
    click.echo(f"dashboard: {server.url}", err=True)
    try:
        yield server.url
    finally:
        server.stop()
