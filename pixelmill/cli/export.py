"""The `export` command: a batch, or an archive's current result per input, as a JSON lines,
CSV or Parquet file (``pixelmill.producer.export``)."""

from __future__ import annotations

import contextlib
import os
import sys

import click

from pixelmill import tasks
from pixelmill.cli.common import open_client, settings_or_exit, user_errors
from pixelmill.producer.output import DEFAULT_LABELS, FORMATS, STDOUT
from pixelmill.stopping import stop_signals_raise


@click.command()
@click.argument("batch", required=False)
@click.option(
    "--latest",
    "source",
    metavar="SOURCE",
    default=None,
    help="Instead of BATCH: the current result of every input under SOURCE (a folder, or an "
    "s3://bucket/prefix/), across all batches: per input, task and model, the job that "
    "finished last (done or failed).",
)
@click.option(
    "--task", type=click.Choice(tasks.names()), default=None, help="--latest: only this task."
)
@click.option(
    "--model",
    "-m",
    default=None,
    help="--latest: only this model (as submitted: a built-in name, hub id or folder).",
)
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Default: from FILE's extension (.jsonl, .ndjson, .csv, .parquet).",
)
@click.option(
    "--output",
    "-o",
    "output",
    required=True,
    metavar="FILE",
    help="The file to write (replaced whole at the end; - for standard output: jsonl, csv).",
)
@click.option(
    "--labels",
    type=click.IntRange(0, 1000),
    default=DEFAULT_LABELS,
    show_default=True,
    help="classify, in CSV and Parquet: how many label_N/score_N column pairs.",
)
def export(
    batch: str | None,
    source: str | None,
    task: str | None,
    model: str | None,
    fmt: str | None,
    output: str,
    labels: int,
) -> None:
    """Write BATCH's jobs, or the latest result per input under SOURCE, to FILE.

    One row per job: input, sha256 (of the input's bytes), task, model, revision, status (done,
    failed or cancelled; queued or running while unfinished), error, reused, reused_from,
    finished (UTC), attempts, device, batch and job, and the result. JSON lines keep the result
    as an object (with the artifact's URI). CSV and Parquet flatten it: classify into label_1,
    score_1 ... label_K, score_K (--labels K); caption into caption; generate into artifact and
    artifact_sha256; and always keep the whole result as JSON text in result_json. Parquet
    columns are typed (float64 scores, bool reused, timestamp[us, UTC] finished). embed adds
    the image embedding: "embedding" in JSON lines (a list of floats) and Parquet (a
    fixed-size list of float32); CSV leaves it out. --latest without --task has the columns
    of every task.

    \b
    DuckDB, pandas and Polars read the files directly:
      duckdb -c "SELECT label_1, count(*) FROM 'labels.parquet' GROUP BY ALL"
      pandas.read_parquet("labels.parquet"), pandas.read_csv("labels.csv")

    Streamed: any number of rows in little memory. FILE is written under a temporary name
    beside it and renamed when complete: a failed or interrupted export leaves no partial file
    (and an existing FILE as it was).

    \b
    Examples:
      pixelmill export 3f0c... -o labels.parquet
      pixelmill export 3f0c... --format jsonl -o - | jq .result
      pixelmill export --latest /archive --task caption -o captions.parquet
      pixelmill export --latest s3://photos/2024/ --task classify --labels 3 -o labels.csv
    """
    if (batch is None) == (source is None):
        raise click.UsageError("give either BATCH or --latest SOURCE (one of the two)")
    if source is None and (task or model):
        raise click.UsageError("--task and --model select jobs for --latest (a BATCH has one)")
    from pixelmill.producer.export import (
        batch_export,
        check_destination,
        format_for,
        latest_export,
        latest_prefix,
        run_export,
    )

    settings = settings_or_exit()
    with user_errors(), stop_signals_raise():
        fmt = format_for(output, fmt)
        if output == STDOUT and fmt == "parquet":
            raise click.UsageError("parquet needs a file: -o FILE.parquet, not -o -")
        check_destination(output)
        with open_client(settings) as client:
            if source is not None:
                prefix = latest_prefix(source)
                what = latest_export(prefix, task=task, model=model)
            else:
                assert batch is not None
                what = batch_export(client.sessions, batch)
            try:
                tally = run_export(client.sessions, what, fmt, output, labels=labels)
            except BrokenPipeError:  # `| head`: the reader has what it wanted
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, sys.stdout.fileno())
                os.close(null)
                return
    where = "standard output" if output == STDOUT else output
    rows = f"{tally.rows} row" + ("" if tally.rows == 1 else "s")
    notes = ""
    if tally.unfinished:
        notes = f"; {tally.unfinished} of them not finished yet"
    if tally.cancelled:
        notes += f"; {tally.cancelled} cancelled"
    if source is not None and tally.rows == 0:
        notes = f"; no finished job under {prefix}"
    click.echo(f"{rows} written to {where} ({fmt}){notes}", err=True)
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
