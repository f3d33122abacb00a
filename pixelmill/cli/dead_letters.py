"""The ``dead-letters`` command: the messages the workers refused, newest first."""

from __future__ import annotations

import json

import click

from pixelmill.cli.common import open_client, settings_or_exit, user_errors


@click.command("dead-letters")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one object).")
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(0),
    help="How many of the newest to list.",
)  # fmt: skip
def dead_letters(as_json: bool, limit: int) -> None:
    """Messages the workers refused, newest first, and how many there are.

    A message that is not JSON, malformed, of an unknown task, or over the size limit (4096
    job ids, 1 MiB) is acknowledged (never redelivered) and recorded with its reason and the
    first 2 KB of its body. --json: {"count": N, "dead_letters": [...]}.
    """
    settings = settings_or_exit()
    with user_errors(), open_client(settings) as client:
        count, records = client.dead_letters(limit)
    if as_json:
        click.echo(json.dumps({"count": count, "dead_letters": [r.to_json() for r in records]}))
        return
    if not count:
        click.echo("no dead letters", err=True)
        return
    shown = f", the newest {len(records)}" if len(records) < count else ""
    click.echo(f"{count} dead letter{'s' if count != 1 else ''}{shown}:")
    for r in records:
        when = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
        head = f"{when}  {r.kind:<15} {r.task or '-'} on {r.queue or '-'}  ({r.size} bytes)"
        click.echo(_one_line(head))
        click.echo(_one_line(f"    {r.reason}"))
        if r.body:
            body = r.body if len(r.body) <= 100 else r.body[:100] + "…"
            click.echo(_one_line(f"    body: {body}"))


def _one_line(text: str) -> str:
    """Control characters escaped (a body may hold anything): one record, a few lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
