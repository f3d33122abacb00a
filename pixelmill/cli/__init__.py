"""The ``pixelmill`` command line, the top layer: every command is here, one module per command
or small family, all registered in ``COMMANDS`` below. A command parses what was typed, calls
the Python API (``pixelmill.Client``) or a layer below, and prints; what it prints with and
its exit statuses are in ``pixelmill.cli.common``. Engines that are not commands have their
own places: ``pixelmill.bench`` (what `pixelmill bench` measures) and ``pixelmill.dashboard``
(the web page, its API and /metrics).

Exit status: 0 every job done; 1 one or more jobs failed; 2 usage or configuration error;
3 a service (broker, database) unreachable, or local workers that cannot start; 4 run --timeout
reached; 5 the batch was cancelled (run, results: some jobs ended cancelled); 128+N run stopped
by signal N after cleaning up (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP); worker drains and exits 0
on these.
"""

from __future__ import annotations

import importlib
import sys

import click

from pixelmill import __version__
from pixelmill.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, fail
from pixelmill.errors import ConfigError

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


# Every command, in the order `pixelmill --help` lists them: (module under pixelmill.cli, name).
COMMANDS = (
    ("submit", "submit"),
    ("batches", "status"),
    ("batches", "results"),
    ("batches", "retry"),
    ("batches", "pause"),
    ("batches", "resume"),
    ("batches", "cancel"),
    ("batches", "priority"),
    ("worker", "worker"),
    ("worker", "flower"),
    ("run", "run"),
    ("bench", "bench"),
    ("bench", "bench_search"),
    ("dashboard", "dashboard"),
    ("dead_letters", "dead_letters"),
    ("export", "export"),
    ("search", "search"),
    ("search", "classify"),
)


def _register() -> None:
    for module, name in COMMANDS:
        cli.add_command(getattr(importlib.import_module(f"pixelmill.cli.{module}"), name))


# A task type that an installed package adds and that cannot be loaded is a usage error said
# in one line when the command runs (exit 2), not a traceback at import.
_BROKEN: ConfigError | None = None
try:
    _register()
except ConfigError as exc:
    _BROKEN = exc


def main() -> None:
    if _BROKEN is not None:
        fail(str(_BROKEN), EXIT_USAGE)
    try:
        cli.main(prog_name="pixelmill", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - click handles most of these
        sys.exit(EXIT_INTERRUPTED)
