"""`pixelmill dashboard`: the command. The page, its API and /metrics: ``pixelmill.dashboard``."""

from __future__ import annotations

import sys
import time

import click

from pixelmill.cli.common import EXIT_OK, EXIT_USAGE, fail, settings_or_exit, user_errors
from pixelmill.errors import InputError
from pixelmill.stopping import Stopped, stop_signals_raise


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
    from pixelmill.dashboard.server import Dashboard
    from pixelmill.dashboard.serving import dashboard_credentials
    from pixelmill.worker.local import embedded_broker

    settings = settings_or_exit()
    try:
        credentials = dashboard_credentials(address)
    except InputError as exc:
        fail(str(exc), EXIT_USAGE)
    with user_errors(), embedded_broker(settings):
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
