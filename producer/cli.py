"""The commands that submit and read: submit, status, results, retry (and what `run`, a
command of the top layer, shares with them: the submit options and the result printing)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from pixelmill.catalog import TASKS, parse_size
from pixelmill.clitools import (
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
from pixelmill.errors import InputError
from pixelmill.producer.client import Client, Submission
from pixelmill.producer.inputs import read_prompts_file
from pixelmill.producer.output import (
    STATES,
    batches_table,
    counts_json,
    pace,
    write_json_lines,
    write_text_lines,
)

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
PLAN = click.option(
    "--plan",
    "plan_only",
    is_flag=True,
    help="A dry run: say how many inputs are new, changed, stale (older model revision or "
    "options) and would be reused, then stop; registers and enqueues nothing. --json: one "
    "line per input.",
)


TASK_OPTIONS = (
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
              *TASK_OPTIONS)  # fmt: skip
    for decorate in reversed(shared):
        command = decorate(command)
    return command


def submission(task: str, inputs: tuple[str, ...], given: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``Client.submit`` for what was typed; InputError on misuse."""
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
    }


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
    """Counts per state for BATCH, and its failures grouped by reason.

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
        failures = client.failures(batch) if counts.by_status.get("failed") else []
    if as_json:
        data = counts_json(counts)
        data["failures"] = [{"reason": r, "jobs": n} for r, n in failures]
        click.echo(json.dumps(data))
        return
    click.echo(f"batch   {counts.batch_id}" + (f"  ({counts.name})" if counts.name else ""))
    click.echo(f"task    {counts.task}   model {counts.model}")
    states = "  ".join(f"{s} {counts.by_status.get(s, 0)}" for s in STATES)
    click.echo(f"jobs    {counts.total}:  {states}")
    if counts.plan is not None:
        click.echo(f"inputs  {plan_counts(counts.plan)}  (reused: done at submit)")
    speed = pace(counts, clock=True)
    if speed:
        click.echo(f"pace    {speed}")
    for reason, n in failures:
        click.echo(f"  failed x{n}: {reason}")


@click.command()
@click.argument("batch")
@JSON
@DOWNLOAD
def results(batch: str, as_json: bool, download: str | None) -> None:
    """One line per job of BATCH, in submission order (--json: one JSON object per line).

    Exits 1 if any job failed.
    """
    settings = settings_or_exit()
    with user_errors(), database_errors(), Client(settings, create=False) as client:
        _done, failed = print_results(client, batch, as_json)
        if download:
            download_artifacts(client, batch, download)
    sys.exit(EXIT_JOBS_FAILED if failed else EXIT_OK)


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
    if as_json:
        click.echo(json.dumps({"batch": batch, "retried": n}))
    else:
        click.echo(f"batch {batch}: {n} failed job(s) queued again")


def print_results(client: Client, batch_id: str, as_json: bool) -> tuple[int, int]:
    """One line per job on stdout; (done, failed). If the reader goes away (`| head`), the
    counts come from the database, so the exit status still says how the jobs ended."""
    writer = write_json_lines if as_json else write_text_lines
    counted = write_until_closed(lambda: writer(client.results(batch_id)))
    if counted is not None:
        return counted
    counts = client.status(batch_id).by_status
    return counts.get("done", 0), counts.get("failed", 0)


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
    for command in (submit, status, results, retry):
        group.add_command(command)
