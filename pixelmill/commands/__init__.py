"""The ``pixelmill`` command line, the top layer. Commands that touch one component live with it:
``pixelmill.producer.cli`` (submit, status, results, retry; export in
``pixelmill.producer.export_cli``), ``pixelmill.worker.cli`` (worker,
flower, dead-letters); the ones that join producer and worker live here: ``run``
(``pixelmill.commands.run``), ``bench`` (``pixelmill.commands.bench_cli``) and ``dashboard``
(``pixelmill.commands.dashboard``).

Exit status: 0 every job done; 1 one or more jobs failed; 2 usage or configuration error;
3 a service (broker, database) unreachable, or local workers that cannot start; 4 run --timeout
reached; 5 the batch was cancelled (run, results: some jobs ended cancelled); 128+N run stopped
by signal N after cleaning up (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP); worker drains and exits 0
on these.
"""

from __future__ import annotations

import sys

import click

from pixelmill import __version__
from pixelmill.clitools import EXIT_INTERRUPTED

EPILOG = """\b
Exit status: 0 every job done; 1 one or more jobs failed; 2 usage or
configuration error; 3 a service (broker, database) unreachable, or local
workers that cannot start; 4 run --timeout reached (results so far printed);
5 the batch was cancelled (run, results: some jobs ended cancelled);
128+N run stopped by signal N, after stopping what it started (130 Ctrl-C,
143 SIGTERM, 129 SIGHUP); worker drains and exits 0 on these.

\b
Configuration (environment, prefix PIXELMILL_; nothing set = embedded default):
  PIXELMILL_BROKER_URL    redis://, rediss:// or redis+socket:///path
  PIXELMILL_DATABASE_URL  sqlite:///file.db or postgresql+psycopg://...
  PIXELMILL_STORE_URL     artifact store: a folder (path or file://) or
                          s3://bucket/prefix (PIXELMILL_S3_* for endpoint, keys)
  PIXELMILL_DATA_DIR      embedded database, store and broker socket
                          (default: ~/.local/share/pixelmill)
  PIXELMILL_BATCH_SIZE    images per model batch (default per task:
                          classify 32, caption 16, generate 4)
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pixelmill")
def cli() -> None:
    """pixelmill: batch image processing on GPU workers through Redis and Celery."""


def _register() -> None:
    from pixelmill.commands.bench_cli import bench
    from pixelmill.commands.bench_search import bench_search
    from pixelmill.commands.dashboard.cli import dashboard
    from pixelmill.commands.run import run
    from pixelmill.producer.cli import register as register_producer
    from pixelmill.producer.export_cli import export
    from pixelmill.producer.search_cli import classify, search
    from pixelmill.worker.cli import register as register_worker
    from pixelmill.worker.deadletter_cli import dead_letters

    register_producer(cli)
    register_worker(cli)
    cli.add_command(run)
    cli.add_command(bench)
    cli.add_command(bench_search)
    cli.add_command(dashboard)
    cli.add_command(dead_letters)
    cli.add_command(export)
    cli.add_command(search)
    cli.add_command(classify)


_register()


def main() -> None:
    try:
        cli.main(prog_name="pixelmill", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - click handles most of these
        sys.exit(EXIT_INTERRUPTED)
