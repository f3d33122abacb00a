"""The commands that serve: worker, flower."""

from __future__ import annotations

import os
import sys

import click

from pixelmill.cli.common import settings_or_exit, user_errors
from pixelmill.logs import configure_logging
from pixelmill.worker.lifecycle import python_command


@click.command()
@click.option(
    "--devices",
    default="auto",
    show_default=True,
    help="auto (one worker per visible GPU, else CPU workers: --cpu-workers), cpu, or GPU "
    "indices: 0,2",
)
@click.option(
    "--cpu-workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Worker processes when the CPU is used; they share the cores (default: one per "
    "core, up to 4).",
)
def worker(devices: str, cpu_workers: int | None) -> None:
    """Run device workers until stopped (SIGTERM or Ctrl-C drains them cleanly).

    One process per device, pinned with CUDA_VISIBLE_DEVICES, restarted if it crashes; the
    device processes die with this one (even on SIGKILL), and a device that already has a
    worker on this host (from another supervisor) is waited for, never shared. SIGTERM, SIGHUP
    and Ctrl-C drain. With no broker configured it uses the embedded Redis in
    PIXELMILL_DATA_DIR (shared with every pixelmill process there, started if needed), so
    `pixelmill submit` from another shell reaches it.
    """
    from pixelmill.db.engine import configured_database
    from pixelmill.settings import mask_url
    from pixelmill.worker.devices import describe_devices, parse_devices
    from pixelmill.worker.local import embedded_broker
    from pixelmill.worker.supervisor import Supervisor

    settings = settings_or_exit()
    configure_logging(settings.log_level)
    with user_errors():
        specs = parse_devices(devices, cpu=cpu_workers)
        # A configured SQLite file's folder must exist (exit 2 naming it, not a crash loop).
        configured_database(settings, migrate=False).dispose()
        # As root, said once here (a dedicated user is safer: the Docker image runs as uid
        # 1000), not by Celery in every device worker.
        root = " (running as root)" if os.geteuid() == 0 else ""
        click.echo(
            f"pixelmill worker: {describe_devices(specs)} on "
            f"{mask_url(settings.resolved_broker_url())}{root}",
            err=True,
        )
        with embedded_broker(settings) as broker:
            Supervisor(specs, settings=settings, broker=broker).run_forever()


@click.command()
@click.option("--port", default=5555, show_default=True, help="HTTP port.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--basic-auth",
    default=None,
    envvar=["PIXELMILL_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH"],
    help="user:password, or several separated by commas. Better given as "
    "PIXELMILL_FLOWER_BASIC_AUTH (or FLOWER_BASIC_AUTH), which no `ps` shows; Flower gets it "
    "through its environment, never its command line. Required unless --address is loopback.",
)
def flower(port: int, address: str, basic_auth: str | None) -> None:
    """Flower on pixelmill's broker: workers, task rates, queue lengths.

    Equivalent to `celery --broker $PIXELMILL_BROKER_URL flower`.
    """
    settings = settings_or_exit()
    if basic_auth is not None and not _valid_basic_auth(basic_auth):
        click.echo(
            "pixelmill flower: --basic-auth must be user:password with a non-empty user and "
            "password (several separated by commas)",
            err=True,
        )
        sys.exit(2)
    if address not in ("127.0.0.1", "::1", "localhost") and not basic_auth:
        click.echo(
            "pixelmill flower: refusing to listen on a non-loopback address without "
            "--basic-auth user:password",
            err=True,
        )
        sys.exit(2)
    env = dict(os.environ, CELERY_BROKER_URL=settings.resolved_broker_url())
    env.pop("PIXELMILL_FLOWER_BASIC_AUTH", None)
    # Through the environment (Flower reads FLOWER_BASIC_AUTH), not argv, which `ps` shows.
    if basic_auth:
        env["FLOWER_BASIC_AUTH"] = basic_auth
    else:
        env.pop("FLOWER_BASIC_AUTH", None)
    # pixelmill's own app: its broker settings, and its task names among Flower's registered.
    argv = python_command("-m", "celery", "-A", "pixelmill.worker.flower_app", "flower",
                          f"--port={port}", f"--address={address}")  # fmt: skip
    argv.append("--broker-api=")  # the Redis broker needs no management API
    os.execve(sys.executable, argv, env)


def _valid_basic_auth(value: str) -> bool:
    """Each comma-separated credential (Flower splits on commas) is user:password, both set."""
    for credential in value.split(","):
        user, colon, password = credential.partition(":")
        if not (colon and user and password):
            return False
    return True
