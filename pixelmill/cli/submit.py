"""`pixelmill submit`: register a batch's jobs and enqueue them (and what `run` shares with it:
the arguments and options, and the plan and submission printed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from pixelmill import tasks
from pixelmill.cli.batches import JSON, plan_counts
from pixelmill.cli.common import open_client, settings_or_exit, user_errors
from pixelmill.errors import InputError
from pixelmill.tasks.base import Flag
from pixelmill.wire import PRIORITIES

if TYPE_CHECKING:
    from pixelmill.producer.client import Client, Submission

TASK = click.argument("task", type=click.Choice(tasks.names()))
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
SHARE = click.option(
    "--share",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="This batch's weight among the batches of its priority running at the same time: "
    "workers take their messages in turn, a batch of share 2 twice as often as one of 1 "
    "(so a script's small batch is not stuck behind a nightly job's big one).",
)
PLAN = click.option(
    "--plan",
    "plan_only",
    is_flag=True,
    help="A dry run: say how many inputs are new, changed, stale (older model revision or "
    "options) and would be reused, then stop; registers and enqueues nothing. --json: one "
    "line per input.",
)


def submit_options(command: Callable[..., None]) -> Callable[..., None]:
    """The arguments and options that `run` and `submit` share."""
    flags: list[Flag] = [flag for task in tasks.registry().values() for flag in task.flags]
    shared: list[Flag] = [TASK, INPUTS, MODEL, JSON, NAME, BATCH_SIZE, AGAIN, FORCE, PLAN,
                          UPLOAD, PRIORITY, SHARE, *flags]  # fmt: skip
    for decorate in reversed(shared):
        command = decorate(command)
    return command


def submission(task: str, inputs: tuple[str, ...], given: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``Client.submit`` for what was typed (``given``: every task
    type's flags); InputError on misuse. Each task type takes its own flags; one set for
    another task is refused, naming it; what is left is the options, as they are."""
    priority = given.pop("priority", "normal")
    share = given.pop("share", 1)
    this = tasks.get(task)
    taken: dict[str, Any] = {}
    for other in tasks.registry().values():
        flags = other.take_flags(given)
        if other is this:
            taken = flags
        else:
            other.refuse_flags(flags, task)
    options = {k: v for k, v in given.items() if v is not None}
    return {**this.submission(inputs, options, taken), "priority": priority, "share": share}


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
    with user_errors(), open_client(settings, create=True) as client:
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
    if not tasks.get(task).reusable:
        raise InputError(f"--plan is for classify and caption ({task} is never reused)")
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
