"""The commands that submit, read and control: submit, status, results, retry, pause, resume,
cancel, priority (and what `run`, a command of the top layer, shares with them: the submit
options and the result printing)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import click

from pixelmill.catalog import DEFAULT_TEMPLATE, DEFAULT_ZERO_SHOT_MODEL, TASKS, parse_size
from pixelmill.clitools import (
    EXIT_CANCELLED,
    EXIT_JOBS_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    fail,
    settings_or_exit,
    user_errors,
    write_until_closed,
)
from pixelmill.db.deadletters import dead_letter_count
from pixelmill.db.engine import database_errors
from pixelmill.db.records import BatchCounts, JobResult
from pixelmill.errors import InputError
from pixelmill.producer.client import Client, Submission
from pixelmill.producer.inputs import read_labels_file, read_prompts_file, split_labels
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

TASK = click.argument("task", type=click.Choice(TASKS))
INPUTS = click.argument("inputs", nargs=-1, metavar="[INPUT]...")
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
DOWNLOAD = click.option(
    "--download",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Also copy the artifacts (generated images) into DIR, as <job id>-0.png.",
)
AGAIN = click.option(
    "--again",
    is_flag=True,
    help="A new batch even if this exact submit (same inputs, unchanged, model and options) "
    "was made before; without it, that batch is used and nothing is done twice.",
)
NAME = click.option("--name", default=None, help="A name for the batch, shown by status.")
FORCE = click.option(
    "--force",
    is_flag=True,
    help="Process every input again: reuse no earlier result (and make a new batch).",
)
UPLOAD = click.option(
    "--upload",
    is_flag=True,
    help="Copy the input files into the object store first (by content: one already there is "
    "not copied again), so that workers on other hosts need no shared mount.",
)
PRIORITY = click.option(
    "--priority",
    type=click.Choice(list(PRIORITIES)),
    default="normal",
    show_default=True,
    help="Workers take a higher priority batch's messages before any of a lower one's (each "
    "worker first finishes the messages it holds). Nightly jobs: low. Change it later with "
    "`pixelmill priority BATCH`.",
)
PLAN = click.option(
    "--plan",
    "plan_only",
    is_flag=True,
    help="A dry run: say how many inputs are new, changed, stale (older model revision or "
    "options) and would be reused, then stop; registers and enqueues nothing. --json: one "
    "line per input.",
)


TASK_OPTIONS = (
    click.option("--labels", "labels_text", default=None, metavar="TEXT", help="classify: "
                 "zero-shot labels in your own words, comma-separated (\"a cat,a dog,a "
                 "receipt\"), scored by a CLIP-style model (default "
                 f"{DEFAULT_ZERO_SHOT_MODEL})."),
    click.option("--labels-file", default=None, type=click.Path(dir_okay=False),
                 help="classify: zero-shot labels, one per line (blank lines and # comments "
                 "skipped); with --labels, those come first."),
    click.option("--template", "templates", multiple=True, metavar="TEXT", help="classify "
                 "--labels: the sentence each label goes into, with {} for the label (default "
                 f"\"{DEFAULT_TEMPLATE}\"); repeat to average several."),
    click.option("--max-new-tokens", type=int, default=None, help="caption: longest caption "
                 "in tokens (default 30)."),
    click.option("--num-beams", type=int, default=None, help="caption: beam search width "
                 "(default 1, greedy)."),
    click.option("--prefix", default=None, help="caption: text every caption starts with "
                 "(conditional captioning)."),
    click.option("--prompt", "prompts", multiple=True, help="generate: a prompt; repeat for "
                 "more."),
    click.option("--prompts-file", type=click.Path(dir_okay=False), default=None,
                 help="generate: a file with one prompt per line."),
    click.option("--init", "init", multiple=True, metavar="INPUT", help="generate: init "
                 "image(s) for image-to-image (file, folder or -); each prompt runs on each."),
    click.option("--count", type=int, default=1, show_default=True, help="generate: images "
                 "per prompt (per init image)."),
    click.option("--seed", type=int, default=None, help="generate: seed of the first image; "
                 "the next ones take seed+1, seed+2, ... (default: random, recorded)."),
    click.option("--steps", type=int, default=None, help="generate: denoising steps (default: "
                 "1 for turbo models, 2 with --init; else 30)."),
    click.option("--size", default=None, metavar="WxH", help="generate: output size, e.g. "
                 "512x512 (default: the model's own)."),
    click.option("--guidance", type=float, default=None, help="generate: guidance scale "
                 "(default 0 for turbo models, else 7.5)."),
    click.option("--strength", type=float, default=None, help="generate --init: how far from "
                 "the init image, 0..1 (default 0.6)."),
    click.option("--negative-prompt", default=None, help="generate: what to steer away from."),
)  # fmt: skip


def submit_options(command: Callable[..., None]) -> Callable[..., None]:
    """The arguments and options that `run` and `submit` share."""
    shared = (TASK, INPUTS, MODEL, JSON, NAME, BATCH_SIZE, AGAIN, FORCE, PLAN, UPLOAD,
              PRIORITY, *TASK_OPTIONS)  # fmt: skip
    for decorate in reversed(shared):
        command = decorate(command)
    return command


def submission(task: str, inputs: tuple[str, ...], given: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``Client.submit`` for what was typed; InputError on misuse."""
    priority = given.pop("priority", "normal")
    labels = zero_shot_labels(task, given.pop("labels_text"), given.pop("labels_file"))
    templates = list(given.pop("templates"))
    if templates and task != "classify":
        raise InputError(f"--template is for classify --labels, not {task}")
    if labels is not None:
        given["labels"] = labels
    if templates:
        given["templates"] = templates
    prompts = list(given.pop("prompts"))
    prompts_file = given.pop("prompts_file")
    if prompts_file:
        prompts += read_prompts_file(prompts_file)
    init = given.pop("init")
    count = given.pop("count")
    seed = given.pop("seed")
    size = given.pop("size")
    if size:
        given["width"], given["height"] = parse_size(size)
    options = {k: v for k, v in given.items() if v is not None}
    if task == "generate":
        if inputs:
            raise InputError(
                "generate takes prompts, not INPUT: pass --prompt TEXT, and --init INPUT for "
                "image-to-image"
            )
        inputs = init
    elif init:
        raise InputError(f"--init is for generate, not {task}")
    elif not inputs:
        raise InputError(f"{task} needs at least one INPUT (a file, a folder or -)")
    return {
        "inputs": list(inputs),
        "options": options,
        "prompts": prompts or None,
        "count": count,
        "seed": seed,
        "priority": priority,
    }


def zero_shot_labels(task: str, text: str | None, path: str | None) -> list[str] | None:
    """The labels of --labels and --labels-file (in that order), or None when neither."""
    if text is None and path is None:
        return None
    if task != "classify":
        raise InputError(f"--labels and --labels-file are for classify, not {task}")
    labels = split_labels(text) if text is not None else []
    if path is not None:
        labels += read_labels_file(path)
    return labels


@click.command()
@submit_options
def submit(
    task: str,
    inputs: tuple[str, ...],
    model: str | None,
    as_json: bool,
    name: str | None,
    batch_size: int | None,
    again: bool,
    force: bool,
    plan_only: bool,
    upload: bool,
    **task_options: Any,
) -> None:
    """Enqueue only: register the jobs, enqueue them and print the batch id.

    Workers (`pixelmill worker`) on the same broker and database do the work; read it back
    with `pixelmill status BATCH` and `pixelmill results BATCH`.

    classify and caption are incremental: an image whose bytes were processed before with the
    same model (revision) and options is done at once with that result (reused); --plan shows
    what would happen, --force reuses nothing. While a batch over the same INPUTs is still in
    progress, its id is printed instead (nothing is submitted twice).

    With --json prints {"batch": "<id>", "jobs": <n>, "queued": <n>, "reused": <n>,
    "plan": {"new": <n>, "changed": <n>, "stale": <n>, "reused": <n>}, "existing": <bool>,
    "attached": <bool>}.
    """
    settings = settings_or_exit()
    with user_errors(), database_errors(), Client(settings) as client:
        args = submission(task, inputs, task_options)
        if plan_only:
            print_plan(client, task, model, args, force, as_json)
            return
        sub = client.submit(task, model=model, name=name, batch_size=batch_size, again=again,
                            force=force, upload=upload, **args)  # fmt: skip
    click.echo(json.dumps(submission_json(sub)) if as_json else sub.batch_id)
    if not as_json or sub.existing or sub.attached:  # stderr: what was found, also with --json
        click.echo(f"batch {sub.batch_id}: {describe(sub)}", err=True)


def submission_json(sub: Submission) -> dict[str, Any]:
    return {
        "batch": sub.batch_id,
        "jobs": sub.jobs,
        "queued": sub.queued,
        "reused": sub.reused,
        "plan": sub.plan,
        "existing": sub.existing,
        "attached": sub.attached,
    }


def describe(sub: Submission) -> str:
    """What a submit did, in words: its jobs, what was reused, or which batch it found."""
    text = f"{sub.jobs} jobs"
    if sub.plan is not None and not (sub.existing or sub.attached):
        text += " (" + plan_counts(sub.plan) + ")"
    return text + seen_before(sub)


def plan_counts(counts: dict[str, int]) -> str:
    shown = [f"{counts.get(k, 0)} {k}" for k in ("new", "changed", "stale", "reused")]
    if counts.get("forced"):
        shown.append(f"{counts['forced']} forced")
    return ", ".join(shown)


def print_plan(
    client: Client,
    task: str,
    model: str | None,
    args: dict[str, Any],
    force: bool,
    as_json: bool,
) -> None:
    """`--plan`: the counts (and with --json, each input's action) on stdout."""
    if task == "generate":
        raise InputError("--plan is for classify and caption (generate is never reused)")
    plan = client.plan(task, args["inputs"], model=model, options=args["options"], force=force)
    if as_json:
        for i, (name, action) in enumerate(zip(plan.inputs, plan.actions, strict=True)):
            line = {"input": name, "action": action, "reused_from": plan.reused_from.get(i)}
            click.echo(json.dumps(line, ensure_ascii=False))
        return
    revision = plan.revision or "unknown (no worker has run it yet)"
    click.echo(f"plan    {task} with {plan.model} (revision {revision})")
    click.echo(f"inputs  {len(plan.inputs)}: {plan_counts(plan.counts)}")
    work = len(plan.inputs) - plan.counts.get("reused", 0)
    click.echo(f"would process {work}, reuse {plan.counts.get('reused', 0)}; nothing was enqueued")


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
        with user_errors(), database_errors(), Client(settings, create=False) as client:
            batches = client.batches(limit)
            dead = dead_letter_count(client.sessions)
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
    with user_errors(), database_errors(), Client(settings, create=False) as client:
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
    with user_errors(), database_errors(), Client(settings, create=False) as client:
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
    with user_errors(), database_errors(), Client(settings, create=False) as client:
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
    with user_errors(), database_errors(), Client(settings, create=False) as client:
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
    with user_errors(), database_errors(), Client(settings, create=False) as client:
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
    with user_errors(), database_errors(), Client(settings, create=False) as client:
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
    with user_errors(), database_errors(), Client(settings, create=False) as client:
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
    """How a batch's jobs ended, as the exit status (README, Exit status): 5 if it was
    cancelled (some jobs ended cancelled: it was not all done, by a person's decision, over
    1), 1 if any job failed, else 0."""
    if cancelled:
        return EXIT_CANCELLED
    return EXIT_JOBS_FAILED if failed else EXIT_OK


def seen_before(sub: Submission) -> str:
    if sub.attached:
        return (
            " (a batch over the same inputs is still in progress: this is that batch, nothing "
            "was submitted twice)"
        )
    if not sub.existing:
        return ""
    return " (this exact submit was made before: its batch, nothing done twice; --again for new)"


def download_artifacts(client: Client, batch: str, folder: str) -> None:
    saved = client.download(batch, folder)
    click.echo(f"{len(saved)} artifacts copied to {folder}", err=True)


def register(group: click.Group) -> None:
    for command in (submit, status, results, retry, pause, resume, cancel, priority):
        group.add_command(command)
