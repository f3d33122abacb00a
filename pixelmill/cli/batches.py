"""The commands that read and control a batch: status, results, retry, pause, resume, cancel,
priority (and what `run`, `submit` and `classify` share with them: the result printing and its
exit status)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from pixelmill.cli.common import (
    EXIT_CANCELLED,
    EXIT_JOBS_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    fail,
    open_client,
    settings_or_exit,
    user_errors,
    write_until_closed,
)
from pixelmill.db.records import BatchCounts, JobResult
from pixelmill.producer.output import (
    STATES,
    batches_table,
    counts_json,
    failures_json,
    failures_text,
    held_state,
    pace,
    write_json_lines,
    write_text_lines,
)
from pixelmill.wire import PRIORITIES

if TYPE_CHECKING:
    from pixelmill.producer.client import Client

JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
DOWNLOAD = click.option(
    "--download",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Also copy the artifacts (generated images) into DIR, as <job id>-0.png.",
)


@click.command()
@click.argument("batch", required=False)
@JSON
@click.option("--wait", "wait_", is_flag=True, help="Wait until every job has finished.")
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1),
    help="Without BATCH: how many of the newest batches to list.",
)  # fmt: skip
def status(batch: str | None, as_json: bool, wait_: bool, limit: int) -> None:
    """Counts per state for BATCH, its pace (and ETA while running), and its failures by
    kind: how many jobs each, the first few inputs, and how many more are not shown.

    Without BATCH: the newest batches, newest first, with their counts (--json: one object
    per line)."""
    settings = settings_or_exit()
    if batch is None:
        if wait_:
            fail("--wait needs a BATCH", EXIT_USAGE)
        with user_errors(), open_client(settings) as client:
            batches = client.batches(limit)
            dead, _ = client.dead_letters(limit=0)
        if as_json:
            for counts in batches:
                click.echo(json.dumps(counts_json(counts)))
        elif batches:
            click.echo(batches_table(batches))
        else:
            click.echo("no batches yet", err=True)
        if dead:  # stderr: --json stays one batch per line
            plural = "s" if dead != 1 else ""
            click.echo(f"{dead} dead letter{plural} (pixelmill dead-letters)", err=True)
        return
    with user_errors(), open_client(settings) as client:
        counts = client.wait(batch) if wait_ else client.status(batch)
        found = client.failures(batch) if counts.by_status.get("failed") else None
    if as_json:
        click.echo(json.dumps(counts_json(counts) | failures_json(found)))
        return
    click.echo(f"batch   {counts.batch_id}" + (f"  ({counts.name})" if counts.name else ""))
    click.echo(f"task    {counts.task}   model {counts.model}")
    held = held_state(counts)
    click.echo(f"state   {held or counts.state}   priority {counts.priority}")
    states = "  ".join(f"{s} {counts.by_status.get(s, 0)}" for s in STATES)
    click.echo(f"jobs    {counts.total}:  {states}")
    if counts.plan is not None:
        click.echo(f"inputs  {plan_counts(counts.plan)}  (reused: done at submit)")
    speed = pace(counts, clock=True)
    if speed:
        click.echo(f"pace    {speed}")
    for line in failures_text(found, counts.batch_id) if found else []:
        click.echo(line)


@click.command()
@click.argument("batch")
@JSON
@DOWNLOAD
def results(batch: str, as_json: bool, download: str | None) -> None:
    """One line per job of BATCH, in submission order (--json: one JSON object per line).

    Exits 1 if any job failed, 5 if the batch was cancelled (some jobs ended cancelled).
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        _done, failed, cancelled = print_results(client, batch, as_json)
        if download:
            download_artifacts(client, batch, download)
    sys.exit(jobs_exit_status(failed, cancelled))


@click.command()
@click.argument("batch")
@JSON
def retry(batch: str, as_json: bool) -> None:
    """Run BATCH's failed jobs again (their attempts start over); prints how many.

    For failures that are worth another go: a model that is now downloaded, a file that was
    fixed in place, a worker that crashed. Wait with `pixelmill status BATCH --wait`.
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        n = client.retry(batch)
        paused = client.status(batch).paused
    if as_json:
        click.echo(json.dumps({"batch": batch, "retried": n, "paused": paused}))
    else:
        later = " (the batch is paused: they start when it is resumed)" if paused and n else ""
        click.echo(f"batch {batch}: {n} failed job(s) queued again{later}")


# ---- control: pause, resume, cancel, priority -------------------------------------------


def _control_json(counts: BatchCounts, **extra: Any) -> str:
    return json.dumps({"batch": counts.batch_id, "state": counts.state,
                       "priority": counts.priority, **extra,
                       **{s: counts.by_status.get(s, 0) for s in STATES}})  # fmt: skip


@click.command()
@click.argument("batch")
@JSON
def pause(batch: str, as_json: bool) -> None:
    """Pause BATCH: workers start none of its queued jobs; the running ones finish.

    `pixelmill resume BATCH` carries on where it stopped: nothing is lost or done twice. A
    `pixelmill run` waiting for the batch keeps waiting (its progress says paused). Pausing a
    paused batch changes nothing; a cancelled one cannot be paused (exit 2).

    With --json prints {"batch": "<id>", "state": "paused", "priority": "<p>", "changed":
    <bool>, "queued": <n>, "running": <n>, ...} (the counts per state).
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        changed = client.pause(batch)
        counts = client.status(batch)
    if as_json:
        click.echo(_control_json(counts, changed=changed))
        return
    queued, running = counts.by_status.get("queued", 0), counts.by_status.get("running", 0)
    what = "paused" if changed else "paused already"
    click.echo(f"batch {batch}: {what}: {queued} queued job(s) wait, {running} running finish "
               f"(`pixelmill resume {batch}` carries on)")  # fmt: skip


@click.command()
@click.argument("batch")
@JSON
def resume(batch: str, as_json: bool) -> None:
    """Resume BATCH, paused by `pixelmill pause`: its queued jobs are enqueued again, at its
    priority, and run; none that ran is run again.

    Resuming a batch that is not paused changes nothing; a cancelled one cannot be resumed
    (exit 2). With --json prints {"batch": "<id>", "state": "<state>", "priority": "<p>",
    "resumed": <n queued jobs enqueued again>, "was_paused": <bool>, ...}.
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        was_paused = client.status(batch).paused
        n = client.resume(batch)
        counts = client.status(batch)
    if as_json:
        click.echo(_control_json(counts, resumed=n, was_paused=was_paused))
    elif was_paused:
        click.echo(f"batch {batch}: resumed: {n} queued job(s) enqueued again")
    else:
        click.echo(f"batch {batch}: not paused: nothing to resume")


@click.command()
@click.argument("batch")
@JSON
def cancel(batch: str, as_json: bool) -> None:
    """Cancel BATCH: its queued jobs end as cancelled, for good; running ones finish and done
    ones keep their results.

    Cancelled is a state of its own, beside done and failed: `status`, `results` and `export`
    show it, and `run` and `results` exit 5 for a batch with cancelled jobs. `retry` leaves
    them; the same submit again makes a new batch. Cancelling again, or cancelling a batch that
    has finished, changes nothing. With --json prints {"batch": "<id>", "state": "<state>",
    "priority": "<p>", "cancelled_now": <n>, "queued": ..., "cancelled": <n>, ...}.
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        already = client.status(batch).cancelled
        n = client.cancel(batch)
        counts = client.status(batch)
    if as_json:
        click.echo(_control_json(counts, cancelled_now=n))
    elif already:
        click.echo(f"batch {batch}: cancelled already")
    elif not counts.cancelled:
        click.echo(f"batch {batch}: finished already: nothing to cancel")
    else:
        running, done = counts.by_status.get("running", 0), counts.by_status.get("done", 0)
        click.echo(f"batch {batch}: cancelled: {n} queued job(s) cancelled, {running} running "
                   f"finish, {done} done keep their results")  # fmt: skip


@click.command()
@click.argument("batch")
@click.argument("level", metavar="high|normal|low", type=click.Choice(list(PRIORITIES)))
@JSON
def priority(batch: str, level: str, as_json: bool) -> None:
    """Give BATCH the priority high, normal or low: its queued jobs are enqueued again at it.

    Workers take a higher priority's messages first (each finishes the messages it holds
    first). Raising takes effect at once; after lowering, the messages already queued at the
    old priority keep their place (each job still runs once). A paused batch's jobs are
    enqueued at the new priority when it is resumed; a cancelled batch cannot be changed
    (exit 2). With --json prints {"batch": "<id>", "state": "<state>", "priority": "<p>",
    "requeued": <n>, ...}.
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        before = client.status(batch).priority
        n = client.set_priority(batch, level)
        counts = client.status(batch)
    if as_json:
        click.echo(_control_json(counts, requeued=n))
    elif before == level:
        click.echo(f"batch {batch}: priority {level} already")
    else:
        later = " (on resume: the batch is paused)" if counts.paused else ""
        click.echo(f"batch {batch}: priority {before} -> {level}: {n} queued job(s) enqueued "
                   f"again at it{later}")  # fmt: skip


def plan_counts(counts: dict[str, int]) -> str:
    shown = [f"{counts.get(k, 0)} {k}" for k in ("new", "changed", "stale", "reused")]
    if counts.get("forced"):
        shown.append(f"{counts['forced']} forced")
    return ", ".join(shown)


def print_results(client: Client, batch_id: str, as_json: bool) -> tuple[int, int, int]:
    """One line per job on stdout; (done, failed, cancelled). If the reader goes away
    (`| head`), the counts come from the database, so the exit status still says how the jobs
    ended."""
    writer = write_json_lines if as_json else write_text_lines
    seen: Counter[str] = Counter()

    def counted(jobs: Iterator[JobResult]) -> Iterator[JobResult]:
        for job in jobs:
            seen[job.status] += 1
            yield job

    written = write_until_closed(lambda: writer(counted(client.results(batch_id))))
    if written is not None:
        return written[0], written[1], seen["cancelled"]
    counts = client.status(batch_id).by_status
    return counts.get("done", 0), counts.get("failed", 0), counts.get("cancelled", 0)


def jobs_exit_status(failed: int, cancelled: int) -> int:
    """How a batch's jobs ended, as the exit status (docs/cli.md, "Exit status"): 5 if it was
    cancelled (some jobs ended cancelled: it was not all done, by a person's decision, over
    1), 1 if any job failed, else 0."""
    if cancelled:
        return EXIT_CANCELLED
    return EXIT_JOBS_FAILED if failed else EXIT_OK


def download_artifacts(client: Client, batch: str, folder: str) -> None:
    saved = client.download(batch, folder)
    click.echo(f"{len(saved)} artifacts copied to {folder}", err=True)
