"""The commands that submit and read: run, submit, status, results."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click

from pixelmill.catalog import TASKS
from pixelmill.clitools import (
    EXIT_JOBS_FAILED,
    EXIT_OK,
    EXIT_SERVICE,
    fail,
    settings_or_exit,
    user_errors,
)
from producer.client import Client
from producer.inputs import InputError, expand_inputs
from producer.output import Progress, counts_json, write_json_lines, write_text_lines

TASK = click.argument("task", type=click.Choice(TASKS))
INPUTS = click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
MODEL = click.option(
    "--model",
    "-m",
    default=None,
    help="Built-in name, Hugging Face hub id or local folder (default: the task's default).",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
BATCH_SIZE = click.option(
    "--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per model batch."
)
NAME = click.option("--name", default=None, help="A name for the batch, shown by status.")


def submit_options(command: Callable[..., None]) -> Callable[..., None]:
    """The arguments and options that `run` and `submit` share."""
    for decorate in reversed((TASK, INPUTS, MODEL, JSON, NAME, BATCH_SIZE)):
        command = decorate(command)
    return command


def _paths(inputs: tuple[str, ...]) -> list[str]:
    paths = expand_inputs(inputs)
    if not paths:
        raise InputError("no image files found in " + ", ".join(inputs))
    return paths


@click.command()
@submit_options
@click.option(
    "--devices",
    default="auto",
    show_default=True,
    help="Local workers: auto (every GPU, else the CPU), cpu, or GPU indices like 0,1.",
)
@click.option(
    "--local-workers/--no-local-workers",
    default=True,
    show_default=True,
    help="Start workers on this host for the run (turn off when a worker fleet serves the "
    "configured broker).",
)
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
def run(
    task: str,
    inputs: tuple[str, ...],
    model: str | None,
    as_json: bool,
    name: str | None,
    batch_size: int | None,
    devices: str,
    local_workers: bool,
    timeout: float | None,
) -> None:
    """Submit, process and print, all in one.

    Uses the configured services; with none configured it starts the embedded ones (Redis on
    a private socket, SQLite and a local-folder store in PIXELMILL_DATA_DIR) and one worker per
    device, waits with a progress display, prints one line per job and stops what it started.

    INPUT is an image file, a folder (searched recursively for images) or - (paths on stdin).

    \b
    Example:
      pixelmill run classify photos/ --json > labels.jsonl
    """
    from worker.local import local_cluster

    settings = settings_or_exit()
    with user_errors():
        paths = _paths(inputs)
        log_dir = settings.data_dir / "logs"
        with (
            local_cluster(settings, devices, workers=local_workers, log_dir=log_dir) as supervisor,
            Client(settings) as client,
        ):
            sub = client.submit(task, paths, model=model, name=name, batch_size=batch_size)
            if not as_json:
                click.echo(f"batch {sub.batch_id}: {sub.jobs} jobs", err=True)

            def check() -> None:
                if supervisor is None:
                    return
                supervisor.poll()
                if supervisor.crashes >= 3:
                    fail(
                        f"local workers crashed {supervisor.crashes} times; giving up "
                        f"(batch {sub.batch_id} stays in the database; worker logs in "
                        f"{log_dir})",
                        EXIT_SERVICE,
                    )

            with Progress(sub.jobs) as progress:
                client.wait(sub.batch_id, timeout=timeout, on_progress=progress.update,
                            check=check)  # fmt: skip
            writer = write_json_lines if as_json else write_text_lines
            done, failed = writer(client.results(sub.batch_id))
        if not as_json:
            click.echo(f"{done} done, {failed} failed", err=True)
    sys.exit(EXIT_JOBS_FAILED if failed else EXIT_OK)


@click.command()
@submit_options
def submit(
    task: str,
    inputs: tuple[str, ...],
    model: str | None,
    as_json: bool,
    name: str | None,
    batch_size: int | None,
) -> None:
    """Enqueue only: register the jobs, enqueue them and print the batch id.

    Workers (`pixelmill worker`) on the same broker and database do the work; read it back
    with `pixelmill status BATCH` and `pixelmill results BATCH`.
    With --json prints {"batch": "<id>", "jobs": <n>}.
    """
    settings = settings_or_exit()
    with user_errors(), Client(settings) as client:
        sub = client.submit(task, _paths(inputs), model=model, name=name, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps({"batch": sub.batch_id, "jobs": sub.jobs}))
    else:
        click.echo(sub.batch_id)


@click.command()
@click.argument("batch")
@JSON
@click.option("--wait", "wait_", is_flag=True, help="Wait until every job has finished.")
def status(batch: str, as_json: bool, wait_: bool) -> None:
    """Counts per state for BATCH, and its failures grouped by reason."""
    settings = settings_or_exit()
    with user_errors(), Client(settings) as client:
        counts = client.wait(batch) if wait_ else client.status(batch)
        failures = client.failures(batch) if counts.by_status.get("failed") else []
    if as_json:
        data = counts_json(counts)
        data["failures"] = [{"reason": r, "jobs": n} for r, n in failures]
        click.echo(json.dumps(data))
        return
    click.echo(f"batch   {counts.batch_id}" + (f"  ({counts.name})" if counts.name else ""))
    click.echo(f"task    {counts.task}   model {counts.model}")
    states = "  ".join(
        f"{s} {counts.by_status.get(s, 0)}" for s in ("queued", "running", "done", "failed")
    )
    click.echo(f"jobs    {counts.total}:  {states}")
    for reason, n in failures:
        click.echo(f"  failed x{n}: {reason}")


@click.command()
@click.argument("batch")
@JSON
def results(batch: str, as_json: bool) -> None:
    """One line per job of BATCH, in submission order (--json: one JSON object per line).

    Exits 1 if any job failed.
    """
    settings = settings_or_exit()
    with user_errors(), Client(settings) as client:
        writer = write_json_lines if as_json else write_text_lines
        _done, failed = writer(client.results(batch))
    sys.exit(EXIT_JOBS_FAILED if failed else EXIT_OK)


def register(group: click.Group) -> None:
    for command in (run, submit, status, results):
        group.add_command(command)
