"""`pixelmill search` and `pixelmill classify --from-embeddings` (``pixelmill.producer.search``)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from pixelmill.catalog import MAX_SEARCH_LIMIT
from pixelmill.cli.batches import jobs_exit_status, print_results
from pixelmill.cli.common import open_client, settings_or_exit, user_errors
from pixelmill.errors import InputError
from pixelmill.producer.output import one_line
from pixelmill.tasks.classify import DEFAULT_TEMPLATE, zero_shot_labels

if TYPE_CHECKING:
    pass


@click.command()
@click.argument("query", required=False)
@click.option(
    "--image",
    default=None,
    type=click.Path(dir_okay=False),
    help="Search by example: the images nearest this one (instead of QUERY).",
)
@click.option("--batch", default=None, help="Only this embed batch's images.")
@click.option(
    "--source",
    default=None,
    metavar="PREFIX",
    help="Only images whose path or URI starts with PREFIX (a folder, s3://b/p/).",
)
@click.option(
    "--model",
    "-m",
    default=None,
    help="The embedding model (default: the batch's, or the only one with embeddings in scope).",
)
@click.option(
    "--limit", type=int, default=20, show_default=True, help=f"Hits, 1..{MAX_SEARCH_LIMIT}."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit and line.")
def search(query: str | None, image: str | None, batch: str | None, source: str | None,
           model: str | None, limit: int, as_json: bool) -> None:  # fmt: skip
    """The embedded images nearest a sentence (QUERY) or an example image (--image), best
    first, each input once, with their cosine similarity.

    The query is embedded here, on the CPU, with the model the images were embedded with
    (`pixelmill run embed INPUT... --model M`); images embedded with another revision of it
    are not compared. With pgvector the database's index answers; otherwise the stored
    vectors in scope are scanned.

    --json: {"rank", "score", "input", "job_id", "batch_id"} per line.

    \b
    Examples:
      pixelmill search "a red car at night" --limit 10
      pixelmill search --image query.jpg --source /archive/2026/ --json
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        hits = client.search(query, image=image, model=model, batch=batch, source=source,
                             limit=limit)  # fmt: skip
    for hit in hits:
        if as_json:
            click.echo(json.dumps(hit.to_json(), ensure_ascii=False))
        else:
            click.echo(f"{hit.rank:>4}  {hit.score:6.3f}  {one_line(hit.input)}")
    if not as_json:
        click.echo(f"{len(hits)} hit(s)", err=True)


@click.command()
@click.option(
    "--labels",
    "labels_text",
    default=None,
    metavar="TEXT",
    help="Labels in your own words, comma-separated.",
)
@click.option(
    "--labels-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Labels, one per line (blank lines and # comments skipped).",
)
@click.option(
    "--template",
    "templates",
    multiple=True,
    metavar="TEXT",
    help="The sentence "
    f'each label goes into, with {{}} (default "{DEFAULT_TEMPLATE}"); repeat to '
    "average several.",
)
@click.option(
    "--from-embeddings",
    "batch",
    required=True,
    metavar="BATCH",
    help="The embed batch whose stored embeddings are scored.",
)
@click.option(
    "--top-k",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="Labels kept per image.",
)
@click.option("--name", default=None, help="A name for the new batch.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image and line.")
def classify(labels_text: str | None, labels_file: str | None, templates: tuple[str, ...],
             batch: str, top_k: int, name: str | None, as_json: bool) -> None:  # fmt: skip
    """Relabel without the GPU: score new labels against an embed batch's stored image
    embeddings, on the CPU, in seconds (no image is read or run through the model again).

    The result is a new classify batch (its id goes to stderr), shown like `pixelmill
    results` and kept like any other: `results`, `export` and the dashboard read it, and a
    later `pixelmill run classify --labels` with the same labels, model and revision reuses
    it. Scores are those zero-shot classify gives for the images themselves.

    \b
    Example:
      pixelmill run embed /photos --model openai/clip-vit-base-patch32
      pixelmill classify --labels "a car,a bicycle,a bus" --from-embeddings <embed batch>
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        labels = zero_shot_labels(labels_text, labels_file)
        if labels is None:
            raise InputError('give the labels: --labels "a,b,c" or --labels-file FILE')
        done = client.relabel(batch, labels, templates=list(templates) or None, top_k=top_k,
                              name=name)  # fmt: skip
        click.echo(f"batch {done.batch_id}: {done.images} images relabelled from the "
                   f"embeddings of batch {done.source} ({done.model})", err=True)  # fmt: skip
        _done, failed, cancelled = print_results(client, done.batch_id, as_json)
    sys.exit(jobs_exit_status(failed, cancelled))
