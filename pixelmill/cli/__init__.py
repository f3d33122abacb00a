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


class _Commands(click.Group):
    """The commands, each imported when it is asked for: `pixelmill --version` imports none,
    `pixelmill status` only its own module, and `pixelmill --help` lists them from their
    summaries in ``COMMANDS`` (tests/test_light_commands.py). A command's module keeps its
    heavy imports (SQL, Celery, torch) inside the functions that use them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The list in `pixelmill --help`, as click writes it, from the summaries below."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        # Shortened as click shortens a command's own help (a stand-in command holding it).
        rows = [(name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit))
                for name in names]  # fmt: skip
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        where = COMMANDS[cmd_name][0]
        module, _, attribute = where.partition(":")
        try:
            command = getattr(importlib.import_module(f"pixelmill.cli.{module}"), attribute)
        except ConfigError as exc:
            # A task type an installed package adds that cannot be loaded: one line naming
            # it, exit 2 (the command's flags come from the task types), not a traceback.
            fail(str(exc), EXIT_USAGE)
            raise  # unreachable
        assert isinstance(command, click.Command) and command.name == cmd_name, where
        return command


@click.group(cls=_Commands, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pixelmill")
def cli() -> None:
    """pixelmill: batch image processing on GPU workers through Redis and Celery."""


# Every command: its name -> ("module under pixelmill.cli:the click command in it", its
# one-line summary for `pixelmill --help`). The summary is the first sentence of the command's
# docstring (tests/test_light_commands.py checks that they agree): `--help` lists the commands
# without importing them.
COMMANDS: dict[str, tuple[str, str]] = {
    "submit": (
        "submit:submit",
        "Enqueue only: register the jobs, enqueue them and print the batch id.",
    ),
    "status": (
        "batches:status",
        "Counts per state for BATCH, its pace (and ETA while running), and its failures by "
        "kind: how many jobs each, the first few inputs, and how many more are not shown.",
    ),
    "results": (
        "batches:results",
        "One line per job of BATCH, in submission order (--json: one JSON object per line).",
    ),
    "retry": (
        "batches:retry",
        "Run BATCH's failed jobs again (their attempts start over); prints how many.",
    ),
    "pause": (
        "batches:pause",
        "Pause BATCH: workers start none of its queued jobs; the running ones finish.",
    ),
    "resume": (
        "batches:resume",
        "Resume BATCH, paused by `pixelmill pause`: its queued jobs are enqueued again, at "
        "its priority, and run; none that ran is run again.",
    ),
    "cancel": (
        "batches:cancel",
        "Cancel BATCH: its queued jobs end as cancelled, for good; running ones finish and "
        "done ones keep their results.",
    ),
    "priority": (
        "batches:priority",
        "Give BATCH the priority high, normal or low: its queued jobs are enqueued again at it.",
    ),
    "worker": (
        "worker:worker",
        "Run device workers until stopped (SIGTERM or Ctrl-C drains them cleanly).",
    ),
    "flower": (
        "worker:flower",
        "Flower on pixelmill's broker: workers, task rates, queue lengths.",
    ),
    "run": ("run:run", "Submit, process and print, all in one."),
    "bench": ("bench:bench", "Measure throughput against its limits, side by side in one run."),
    "bench-queue": (
        "bench:bench_queue",
        "What a batch's size costs the broker, and how a small batch fares behind a big one.",
    ),
    "bench-search": (
        "bench:bench_search",
        "Time `pixelmill search` over many stored embeddings (synthetic, unit length): the "
        "latency of one query (20 hits) once the query is embedded, on SQLite or PostgreSQL.",
    ),
    "dashboard": (
        "dashboard:dashboard",
        "A live web page of the fleet and the batches, with their controls, and its JSON API.",
    ),
    "dead-letters": (
        "dead_letters:dead_letters",
        "Messages the workers refused, newest first, and how many there are.",
    ),
    "export": (
        "export:export",
        "Write BATCH's jobs, or the latest result per input under SOURCE, to FILE.",
    ),
    "search": (
        "search:search",
        "The embedded images nearest a sentence (QUERY) or an example image (--image), best "
        "first, each input once, with their cosine similarity.",
    ),
    "classify": (
        "search:classify",
        "Relabel without the GPU: score new labels against an embed batch's stored image "
        "embeddings, on the CPU, in seconds (no image is read or run through the model "
        "again).",
    ),
}


def main() -> None:
    try:
        cli.main(prog_name="pixelmill", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - click handles most of these
        sys.exit(EXIT_INTERRUPTED)
