"""`pixelmill submit`: register a batch's jobs and enqueue them (and what `run` shares with it:
the arguments and options, and the plan and submission printed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from pixelmill.catalog import DEFAULT_TEMPLATE, DEFAULT_ZERO_SHOT_MODEL, TASKS, parse_size
from pixelmill.cli.batches import JSON, plan_counts
from pixelmill.cli.common import settings_or_exit, user_errors
from pixelmill.db.engine import database_errors
from pixelmill.errors import InputError
from pixelmill.producer.client import Client, Submission
from pixelmill.producer.inputs import read_labels_file, read_prompts_file, split_labels
from pixelmill.wire import PRIORITIES

TASK = click.argument("task", type=click.Choice(TASKS))
INPUTS = click.argument("inputs", nargs=-1, metavar="[INPUT]...")
MODEL = click.option(
    "--model",
    "-m",
    default=None,
    help="Built-in name, Hugging Face hub id or local folder (default: the task's default).",
)
BATCH_SIZE = click.option(
    "--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per model batch."
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


def seen_before(sub: Submission) -> str:
    if sub.attached:
        return (
            " (a batch over the same inputs is still in progress: this is that batch, nothing "
            "was submitted twice)"
        )
    if not sub.existing:
        return ""
    return " (this exact submit was made before: its batch, nothing done twice; --again for new)"
