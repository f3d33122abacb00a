"""How results and progress look on the terminal, and the ``--json`` line contract."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from pixelmill.db.records import BatchCounts, Failures, JobResult, JobStatus

# `pixelmill export`: its formats, the file name that means standard output, and how many of a
# classify result's labels a row holds by default (here, not in producer.export: the command's
# flags are read without importing what reads the database).
FORMATS = ("jsonl", "csv", "parquet")
STDOUT = "-"
DEFAULT_LABELS = 5


def write_json_lines(results: Iterable[JobResult], out: TextIO = sys.stdout) -> tuple[int, int]:
    """One JSON object per job per line; returns (done, failed)."""
    done = failed = 0
    for r in results:
        out.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        done += r.status == "done"
        failed += r.status == "failed"
    out.flush()
    return done, failed


def write_text_lines(results: Iterable[JobResult], out: TextIO = sys.stdout) -> tuple[int, int]:
    """One readable line per job: status, input, and the top label or the error. Control
    characters (a newline in a file name or a caption) are escaped as in the JSON: one job,
    one line."""
    done = failed = 0
    for r in results:
        if r.status == "done":
            done += 1
            shown = r.artifact.uri if r.artifact else summarize(r.result)
            mark = "  (reused)" if r.reused else ""
            out.write(one_line(f"done    {r.input}  {shown}{mark}") + "\n")
        elif r.status == "failed":
            failed += 1
            out.write(one_line(f"FAILED  {r.input}  {r.error}") + "\n")
        else:
            out.write(one_line(f"{r.status:<7} {r.input}") + "\n")
    out.flush()
    return done, failed


# What could break a line (or drive the terminal): C0 and C1 controls, DEL, and the separators
# that str.splitlines() also splits on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def one_line(text: str) -> str:
    """``text`` with control characters escaped the way JSON writes them (``\\n``,
    ``\\u001b``)."""
    return _CONTROL.sub(lambda m: _SHORT_ESCAPES.get(m[0], f"\\u{ord(m[0]):04x}"), text)


def summarize(result: dict[str, Any] | None) -> str:
    """A done job's result on one line: as its task type reads it, else as JSON."""
    if not result:
        return ""
    from pixelmill import tasks  # the task types (pydantic models): not for `status`

    for task in tasks.registry().values():
        line = task.summarize(result)
        if line is not None:
            return line
    return json.dumps(result, ensure_ascii=False)


def counts_json(counts: BatchCounts) -> dict[str, Any]:
    now = datetime.now(UTC)
    rate, eta = counts.rate(now), counts.eta_seconds(now)
    return {
        "batch": counts.batch_id,
        "name": counts.name,
        "task": counts.task,
        "model": counts.model,
        "created": counts.created_at.isoformat() if counts.created_at else None,
        "state": counts.state,
        "priority": counts.priority,
        "total": counts.total,
        **{s: counts.by_status.get(s, 0) for s in STATES},
        "reused": counts.reused,
        "plan": counts.plan,
        "items_per_second": round(rate, 3) if rate is not None else None,
        "eta_seconds": round(eta, 1) if eta is not None else None,
    }


STATES = tuple(status.value for status in JobStatus)  # in the order a job moves


def failures_json(found: Failures | None) -> dict[str, Any]:
    """A batch's failures by kind, for ``status --json`` and the dashboard's API: per kind
    its jobs and first inputs (``inputs``; ``examples``: each with what its error says beyond
    the kind), then how many kinds and jobs are not listed."""
    found = found or Failures([], 0, 0)
    return {
        "failures": [
            {
                "reason": g.kind,
                "jobs": g.jobs,
                "inputs": [e.input for e in g.examples],
                "examples": [{"input": e.input, "detail": e.detail} for e in g.examples],
            }
            for g in found.groups
        ],
        "failures_not_shown": {"kinds": found.more_kinds, "jobs": found.more_jobs},
    }


def failures_text(found: Failures, batch_id: str) -> list[str]:
    """A batch's failures by kind, as lines: the count and kind, then its first inputs (each
    with its own detail), then how many more inputs, and kinds, are not shown."""
    if not found.jobs:
        return []
    plural = "s" if found.kinds != 1 else ""
    lines = [f"failed  {found.jobs} job(s), {found.kinds} kind{plural} of failure:"]
    width = len(str(found.groups[0].jobs)) if found.groups else 1
    for group in found.groups:
        lines.append(f"  {group.jobs:>{width}} × {group.kind}")
        for example in group.examples:
            detail = f"  {example.detail}" if example.detail else ""
            lines.append(f"  {'':>{width}}     {example.input}{detail}")
        more = group.jobs - len(group.examples)
        if more > 0:
            lines.append(f"  {'':>{width}}     … and {more} more")
    if found.more_kinds:
        lines.append(
            f"  … and {found.more_kinds} more kind(s) of failure ({found.more_jobs} job(s)) not "
            f"shown: `pixelmill results {batch_id}` lists every job"
        )
    return lines


def batches_table(batches: list[BatchCounts]) -> str:
    """The newest batches as an aligned table, newest first (local time)."""
    rows = [("BATCH", "CREATED", "TASK", "MODEL", "STATE", "PRIORITY", "JOBS",
             *(s.upper() for s in STATES), "NAME")]  # fmt: skip
    for b in batches:
        created = b.created_at.astimezone().strftime("%Y-%m-%d %H:%M") if b.created_at else ""
        counts = (str(b.by_status.get(s, 0)) for s in STATES)
        rows.append((b.batch_id, created, b.task, b.model, b.state, b.priority, str(b.total),
                     *counts, b.name or ""))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in rows
    )


class Progress:
    """Progress on stderr: a bar with items/s and the ETA when stderr is a terminal; otherwise
    (cron, systemd, a log file) one line every ``every`` seconds, so a log says how far an
    unattended run got and when it should end. Reused jobs count as finished but not in the
    items/s."""

    def __init__(
        self,
        total: int,
        *,
        enabled: bool | None = None,
        every: float = 60,
        out: TextIO | None = None,
    ) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None
        self.total = total
        self.every = every
        self.out = out
        self._last_line = time.monotonic()
        self._held = ""

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                TextColumn("{task.fields[pace]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("processing", total=self.total, failed=0, pace="")
        return self

    def update(self, counts: BatchCounts) -> None:
        held = held_state(counts)  # paused or cancelled (by `pixelmill pause`/`cancel`), or ""
        speed = held or pace(counts)
        if self._progress is not None:
            self._progress.update(
                self._task,
                description=held.split(" ")[0] if held else "processing",
                completed=counts.finished,
                failed=counts.by_status.get("failed", 0),
                pace=speed,
            )
            return
        now = time.monotonic()
        changed = held != self._held  # a pause, resume or cancel is said at once
        self._held = held
        due = self.every and now - self._last_line >= self.every and not counts.complete
        if changed or due:
            self._last_line = now
            out = self.out or sys.stderr
            failed = counts.by_status.get("failed", 0)
            line = f"progress: {counts.finished}/{counts.total} finished ({failed} failed"
            cancelled = counts.by_status.get("cancelled", 0)
            line += f", {cancelled} cancelled)" if cancelled else ")"
            out.write(line + (f", {speed}" if speed else "") + "\n")
            out.flush()

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def held_state(counts: BatchCounts) -> str:
    """What holds an unfinished batch up, in words: "paused (pixelmill resume BATCH)", or
    "cancelled" (its running jobs finish), or "" when nothing does."""
    if counts.cancelled and not counts.complete:
        return "cancelled (its running jobs finish)"
    if counts.paused and not counts.complete:
        return "paused (no new job starts until `pixelmill resume`)"
    return ""


def pace(counts: BatchCounts, *, clock: bool = False) -> str:
    """Items/s so far and, while unfinished, the ETA ("" before any job ran); ``clock``: as
    "about 3m05s left (ends ~14:02:11)" instead of "ETA 3m05s"."""
    now = datetime.now(UTC)
    rate = counts.rate(now)
    if rate is None:
        return ""
    text = f"{rate:.1f} items/s"
    eta = counts.eta_seconds(now)
    if eta is not None and not counts.complete:
        if clock:
            ends = (now + timedelta(seconds=eta)).astimezone().strftime("%H:%M:%S")
            text += f", about {duration(eta)} left (ends ~{ends})"
        else:
            text += f", ETA {duration(eta)}"
    return text


def elapsed(seconds: float) -> str:
    """``seconds`` as 9.4s under a minute, else as ``duration``."""
    return f"{seconds:.1f}s" if seconds < 59.95 else duration(seconds)


def duration(seconds: float) -> str:
    """``seconds`` as 42s, 3m05s or 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
