"""``pixelmill bench`` and ``pixelmill bench-search``: the commands. The measuring is in
``pixelmill.bench`` (throughput, dashboard, search)."""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

import click

from pixelmill import tasks
from pixelmill.catalog import parse_size
from pixelmill.cli.common import user_errors
from pixelmill.errors import InputError

ROWS = [
    ("model_only_ips", "model only (items/s): the ceiling"),
    ("e2e_ips", "end to end (items/s)"),
    ("naive_ips", "naive: one task per image, batch 1 (items/s)"),
    ("null_ips", "null model end to end (items/s)"),
    ("null_ips_one_worker", "null model, one worker (items/s)"),
    ("celery_noop_tps", "plain Celery no-op (tasks/s)"),
    ("e2e_over_model_only", "end to end / model only"),
    ("e2e_over_naive", "end to end / naive"),
    ("null_over_celery_noop", "null / Celery no-op"),
    ("null_scaling", "null: workers / one worker"),
    ("e2e_observed_ips", "end to end, dashboard open + /metrics every 1 s (items/s)"),
    ("observed_over_plain", "observed / plain end to end"),
    ("dashboard_cpu_share", "dashboard process, CPU (cores) while observed"),
    ("chromium_cpu_share", "chromium, CPU (cores) while observed"),
]


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r}: expected KEY=VALUE, e.g. steps=2")
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), value


@click.command()
@click.argument("task", type=click.Choice(tasks.names()))
@click.option(
    "--model",
    "-m",
    default=None,
    help="Default: the task's default. Also: null, a hub id or a folder, or a full-size "
    "architecture with random weights (the real model's compute, where its weights cannot be "
    "downloaded): vit_b16_random (classify), blip_base_random (caption), sd_turbo_random "
    "(generate), clip_vit_b32_random (embed and classify --labels: their default here).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option(
    "--images",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Items per measure (images, or prompts for generate).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=None,
    help="Default: the task's (classify 32, caption 16, generate 4).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="CPU worker processes (default: as `pixelmill worker`, one per core up to 4). With "
    "more than one, the null model is also measured with one worker, for the scaling.",
)
@click.option(
    "--image-size",
    default="640x480",
    show_default=True,
    metavar="WxH",
    help="Size of the generated JPEG inputs.",
)
@click.option(
    "--naive-images",
    type=click.IntRange(1),
    default=None,
    help="Items for the naive measure (default: --images).",
)
@click.option("--noop-tasks", type=click.IntRange(1), default=2000, show_default=True)
@click.option(
    "--set",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A task option, e.g. --set steps=2 --set width=64 --set height=64.",
)
@click.option(
    "--repeat",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Runs of each measure; the figures are medians (all runs are in --json).",
)
@click.option(
    "--with-dashboard",
    is_flag=True,
    help="Only end to end, plain and observed (`pixelmill dashboard` serving, its page open in "
    "headless chromium, /metrics scraped every second), alternating; prints observed / plain. "
    "Needs chromium and playwright (`scripts/setup test`).",
)
@click.option(
    "--labels",
    "labels_text",
    default=None,
    metavar="TEXT",
    help="classify: zero-shot labels, comma-separated (the model defaults to "
    "clip_vit_b32_random: CLIP ViT-B/32 with random weights).",
)
@click.option(
    "--template",
    "templates",
    multiple=True,
    metavar="TEXT",
    help="classify --labels: the sentence each label goes into, with {}; repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def bench(
    task: str,
    model: str | None,
    device: str,
    images: int,
    batch_size: int | None,
    workers: int | None,
    image_size: str,
    naive_images: int | None,
    noop_tasks: int,
    options: tuple[str, ...],
    repeat: int,
    with_dashboard: bool,
    labels_text: str | None,
    templates: tuple[str, ...],
    as_json: bool,
) -> None:
    """Measure throughput against its limits, side by side in one run.

    model only (the model alone on prepared inputs already on the device), end to end (JPEG
    files -> submit -> Redis -> worker -> results in the database), naive (one Celery task per
    image, batch size 1), the null model (queue, database and I/O alone) and plain Celery
    no-op tasks. Runs on a private embedded broker and database in a temporary folder.

    \b
    Example:
      pixelmill bench classify --images 256
      pixelmill bench classify --device cuda:0 --model vit_b16_random --batch-size 256
      pixelmill bench caption --device cuda:0 --model blip_base_random --images 2048
      pixelmill bench generate --device cuda:0 --model sd_turbo_random --images 256
      pixelmill bench embed --images 512
      pixelmill bench classify --labels "a cat,a dog,a receipt,a parcel,a car" --images 512
    """
    from pixelmill.bench.throughput import BenchConfig, run_bench

    with user_errors():
        cfg = BenchConfig(
            task=task,
            model=model,
            device=device,
            images=images,
            batch_size=batch_size,
            workers=workers,
            image_size=parse_size(image_size),
            naive_images=naive_images,
            noop_tasks=noop_tasks,
            options=tuple(_option(o) for o in options) + _zero_shot(task, labels_text, templates),
            repeat=repeat,
            with_dashboard=with_dashboard,
        )
        figures = run_bench(cfg, progress=lambda step: click.echo(f"bench: {step}", err=True))
    if as_json:
        click.echo(json.dumps(figures))
        return
    _table(figures)


def _zero_shot(
    task: str, labels_text: str | None, templates: tuple[str, ...]
) -> tuple[tuple[str, Any], ...]:
    """--labels and --template as task options (classify only)."""
    from pixelmill.tasks.classify import zero_shot_labels

    if labels_text is not None and task != "classify":
        raise InputError(f"--labels and --labels-file are for classify, not {task}")
    labels = zero_shot_labels(labels_text, None)
    if templates and labels is None:
        raise InputError("--template applies to --labels")
    out: tuple[tuple[str, Any], ...] = ()
    if labels is not None:
        out += (("labels", labels),)
    if templates:
        out += (("templates", list(templates)),)
    return out


def _table(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{figures['task']} · {figures['model']} · {figures['device']} ({figures['device_name']})"
        f" · {figures['precision']} · batch {figures['batch_size']} (forward"
        f" {figures['forward_batch']}) · {figures['images']} items"
        f" ({figures['image_size']}) · {figures['workers']} worker(s) · median of"
        f" {figures['repeat']}"
    )
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, label in ROWS:
        if key in figures:
            table.add_row(label, f"{figures[key]:,}")
    Console(file=sys.stdout).print(table)


@click.command("bench-search")
@click.option("--rows", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Stored embeddings.")  # fmt: skip
@click.option("--dim", type=click.IntRange(1, 4096), default=512, show_default=True)
@click.option("--queries", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--database", default=None, metavar="URL", help="An empty PostgreSQL database "
              "to fill (default: a temporary SQLite file, removed afterwards).")  # fmt: skip
def bench_search(rows: int, dim: int, queries: int, database: str | None) -> None:
    """Time `pixelmill search` over many stored embeddings (synthetic, unit length): the
    latency of one query (20 hits) once the query is embedded, on SQLite or PostgreSQL.

    \b
    Example:
      pixelmill bench-search --rows 1000000 --dim 512
    """
    from pixelmill.bench.search import run_search_bench

    def say(text: str) -> None:
        click.echo(f"bench-search: {text}", err=True)

    with user_errors():
        got = run_search_bench(rows, dim, queries, database, say)
    times, filled = got["times"], got["filled"]
    kind = "postgresql" if got["url"].startswith("postgresql") else "sqlite"
    how = "pgvector index" if got["indexed"] else "vectorised scan (numpy, chunks)"
    median = statistics.median(times)
    click.echo(f"{kind}, {rows:,} embeddings x {dim}-d, {how}")
    click.echo(f"  fill            {filled:10.1f} s")
    click.echo(f"  first query     {times[0] * 1000:10.0f} ms")
    click.echo(f"  median query    {median * 1000:10.0f} ms  ({rows / median:,.0f} rows/s)")
    click.echo(f"  slowest query   {max(times) * 1000:10.0f} ms  ({queries} queries)")


@click.command("bench-queue")
@click.option(
    "--jobs",
    "counts",
    default="1000,100000,1000000",
    show_default=True,
    metavar="N,N,...",
    help="Batch sizes to register, measure and cancel.",
)
@click.option(
    "--small", type=click.IntRange(1), default=100, show_default=True, help="Small batch's jobs."
)
@click.option(
    "--big",
    type=click.IntRange(0),
    default=100_000,
    show_default=True,
    help="Jobs of the big batch the small one is submitted behind (0: skip).",
)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="CPU worker processes (default: as `pixelmill worker`).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def bench_queue(
    counts: str, small: int, big: int, batch_size: int, workers: int | None, as_json: bool
) -> None:
    """What a batch's size costs the broker, and how a small batch fares behind a big one.

    For each size in --jobs: the batch registered (jobs/s), the broker's messages and memory
    (Redis used_memory) with its window sent, and its cancel, timed to its first commit (in
    effect: no job of it starts after) and to its last queued job ended. Then, with the null model
    on local workers, a --small batch alone and behind a --big batch of the same priority:
    both times, their ratio, the target (2 x alone + one message per worker) and the big
    batch's rate before and while the small one runs. Runs on a private embedded broker and
    SQLite database in a temporary folder.

    \b
    Example:
      pixelmill bench-queue
      pixelmill bench-queue --jobs 1000,1000000,10000000 --big 0
    """
    from pixelmill.bench.queue import run_queue_bench

    with user_errors():
        try:
            sizes = [int(n) for n in counts.split(",") if n.strip()]
        except ValueError:
            raise InputError(f"--jobs {counts!r}: expected numbers, e.g. 1000,100000") from None
        say = lambda step: click.echo(f"bench: {step}", err=True)  # noqa: E731
        figures = run_queue_bench(sizes, small=small, big=big, size=batch_size, workers=workers,
                                  progress=say)  # fmt: skip
    if as_json:
        click.echo(json.dumps(figures))
        return
    click.echo(f"window {figures['window']} messages of {figures['batch_size']} jobs")
    click.echo(f"{'jobs':>10} {'register s':>11} {'jobs/s':>8} {'messages':>9} "
               f"{'redis bytes':>12} {'cancel s: in effect':>19} {'all':>6}")  # fmt: skip
    for row in figures["sizes"]:
        click.echo(
            f"{row['jobs']:>10,} {row['register_s']:>11} {row['jobs_per_s']:>8,} "
            f"{row['messages']:>9} {row['redis_bytes']:>12,} {row['cancel_effect_s']:>19} "
            f"{row['cancel_s']:>6}"
        )
    fair = figures.get("fair_share")
    if fair:
        click.echo(
            f"fair share, {fair['workers']} worker(s): {fair['small_jobs']} jobs alone "
            f"{fair['small_alone_s']} s, behind {fair['big_jobs']:,} "
            f"{fair['small_behind_big_s']} s "
            f"(x{fair['behind_over_alone']}; target {fair['target_s']} s); the big batch "
            f"{fair['big_ips_before']} items/s before, {fair['big_ips_during']} while"
        )
