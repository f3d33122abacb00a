"""The `pixelmill dashboard` command, and the credentials `run --dashboard` shares with it."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

import click

from pixelmill.clitools import (
    EXIT_OK,
    EXIT_USAGE,
    Stopped,
    fail,
    settings_or_exit,
    stop_signals_raise,
    user_errors,
)
from pixelmill.db.engine import database_errors
from pixelmill.errors import InputError
from pixelmill.settings import Settings

ENV_AUTH = "PIXELMILL_DASHBOARD_BASIC_AUTH"


def dashboard_credentials(address: str) -> list[tuple[str, str]] | None:
    """The credentials from PIXELMILL_DASHBOARD_BASIC_AUTH (never from the command line,
    which `ps` shows); InputError when they are malformed, or missing for a non-loopback
    ``address``."""
    from pixelmill.commands.dashboard.server import is_loopback, parse_credentials

    credentials = parse_credentials(os.environ.get(ENV_AUTH))
    if credentials is None and not is_loopback(address):
        raise InputError(
            f"refusing to listen on a non-loopback address ({address}) without "
            f"authentication: set {ENV_AUTH}=user:password"
        )
    return credentials


@click.command()
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="HTTP port (0: any free one).",
)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Any but loopback needs PIXELMILL_DASHBOARD_BASIC_AUTH.",
)
def dashboard(port: int, address: str) -> None:  # fmt: skip
    """A live web page of the fleet and the batches, with their controls, and its JSON API.

    Workers with their devices, models, heartbeat and items/s; queue depth per priority;
    batches with progress, items/s and ETA; a batch's failures by reason, its contact sheet
    and throughput; pause, resume, cancel, retry failed, priority and export. /api/... gives
    the same data as JSON; /metrics is Prometheus' exposition.

    Credentials come from PIXELMILL_DASHBOARD_BASIC_AUTH=user:password (several separated by
    commas), never the command line: then every route asks for them (HTTP basic auth). Without
    them the dashboard listens on loopback only. Stops on Ctrl-C, SIGTERM or SIGHUP (exit 0).
    """
    from pixelmill.commands.dashboard.server import Dashboard
    from pixelmill.worker.local import embedded_broker

    settings = settings_or_exit()
    try:
        credentials = dashboard_credentials(address)
    except InputError as exc:
        fail(str(exc), EXIT_USAGE)
    with user_errors(), database_errors(), embedded_broker(settings):
        try:
            server = Dashboard(settings, address=address, port=port, credentials=credentials)
        except OSError as exc:
            fail(f"cannot listen on {address}:{port}: {exc.strerror or exc}", EXIT_USAGE)
        click.echo(f"pixelmill dashboard: {server.url}", err=True)
        # The server has a thread of its own; the main thread only waits. A stop signal then
        # raises here, never inside one of the server's callbacks (where its event loop would
        # log it and carry on serving).
        try:
            with stop_signals_raise():
                server.start()
                while server.serving():
                    time.sleep(0.5)
        except (Stopped, KeyboardInterrupt):
            pass
        finally:
            server.stop()
    sys.exit(EXIT_OK)


@contextlib.contextmanager
def served_dashboard(settings: Settings, enabled: bool, port: int) -> Iterator[str | None]:
    """`run --dashboard`: the dashboard on loopback (PIXELMILL_DASHBOARD_BASIC_AUTH, if set,
    asked for) in a thread of this process, for as long as the block runs; its URL printed on
    stderr. It dies with the run: a thread, nothing left behind."""
    if not enabled:
        yield None
        return
    from pixelmill.commands.dashboard.server import Dashboard

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
