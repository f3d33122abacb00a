"""`pixelmill export`: a batch's jobs, or an archive's current result per input, as one file
that DuckDB, pandas, Polars or a spreadsheet read directly: JSON lines, CSV or Parquet.

One row per job: its input, content hash, task, model and revision, status and error, whether
it was reused (and from which job), when it finished (UTC), its attempts and device, and the
batch and job ids. JSON lines keep the result as an object; CSV and Parquet flatten it into
columns chosen by the task (classify: ``label_1, score_1, ...``; caption: ``caption``;
generate: ``artifact, artifact_sha256``) and keep the whole of it in ``result_json``. embed
adds the image embedding: an ``embedding`` list of floats in JSON lines, a list<float32>
column in Parquet (fixed-size when every vector has one length); CSV leaves it out (a vector
is no spreadsheet cell: export Parquet or JSON lines for it).

Streamed both ways: the rows are read a page at a time and written as they come (a Parquet
row group every ``ROW_GROUP`` rows), so memory does not grow with the export. A file is written
under a temporary name next to it and renamed at the end: a failed or interrupted export
leaves the previous file (if any) as it was, never half of a new one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from sqlalchemy.orm import Session, sessionmaker

from pixelmill import tasks
from pixelmill.db.embeddings import embedded_models, job_embeddings
from pixelmill.db.reads import get_batch, iter_batch_jobs, iter_latest_jobs
from pixelmill.db.records import JobResult
from pixelmill.db.sources import is_remote, split_uri
from pixelmill.errors import InputError
from pixelmill.producer.output import DEFAULT_LABELS, FORMATS, STDOUT
from pixelmill.tasks import Column

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
ROW_GROUP = 10_000  # rows per Parquet row group: what is held in memory at a time
PAGE = 1000  # rows per database read


# Every export has these, in this order; the task's result columns and result_json follow.
BASE_COLUMNS = (
    Column("input"),
    Column("sha256"),
    Column("task"),
    Column("model"),
    Column("revision"),
    Column("status"),
    Column("error"),
    Column("reused", "bool"),
    Column("reused_from"),
    Column("finished", "timestamp"),
    Column("attempts", "int"),
    Column("device"),
    Column("batch"),
    Column("job"),
)
RESULT_JSON = Column("result_json")
# An embed job's vector by job id, filled a page at a time as the jobs stream
# (``with_vectors``); empty when nothing exported is an embed job.
Vectors = dict[str, list[float]]


def result_columns(names: Collection[str], labels: int = DEFAULT_LABELS) -> list[Column]:
    """The columns results of the task types ``names`` flatten into (in the registry's
    order)."""
    return [c for name, task in tasks.registry().items() if name in names
            for c in task.export_columns(labels)]  # fmt: skip


def columns_for(names: Collection[str], labels: int = DEFAULT_LABELS) -> list[Column]:
    """The columns of a CSV or Parquet export of jobs of the task types ``names``."""
    for name in names:
        tasks.get(name)  # InputError for an unknown one
    return [*BASE_COLUMNS, *result_columns(names, labels), RESULT_JSON]


def flat_row(
    job: JobResult, columns: Collection[Column], vectors: Vectors | None = None
) -> list[Any]:
    """``job`` as the values of ``columns`` (None where there is nothing: a failed job's
    result, a fourth label of three)."""
    result = job.result
    values = _base(job)
    values["result_json"] = _json(result) if result is not None else None
    values["embedding"] = (vectors or {}).get(job.job)
    task = tasks.registry().get(job.task)
    if result and task is not None:
        values.update(task.export_values(result))
    return [_typed(values.get(c.name), c) for c in columns]


def json_row(job: JobResult, vectors: Vectors | None = None) -> dict[str, Any]:
    """``job`` as one JSON lines object: the result as an object, the artifact's URI (and an
    embed job's ``embedding``)."""
    row = _base(job)
    row["finished"] = job.finished_at.isoformat() if job.finished_at else None
    row["result"] = job.result
    row["artifact"] = row.pop("artifact")  # after the result, as the other keys
    row["artifact_sha256"] = row.pop("artifact_sha256")
    if _embeds(job.task):
        row["embedding"] = (vectors or {}).get(job.job)
    return row


def _base(job: JobResult) -> dict[str, Any]:
    """What every format says of a job, in column order: who, what, how it ended, and the
    artifact's URI and sha256."""
    return {
        "input": job.input,
        "sha256": job.content_sha256,
        "task": job.task,
        "model": job.model,
        "revision": job.model_revision,
        "status": job.status,
        "error": job.error,
        "reused": job.reused,
        "reused_from": job.reused_from,
        "finished": job.finished_at,
        "attempts": job.attempts,
        "device": job.device,
        "batch": job.batch_id,
        "job": job.job,
        "artifact": job.artifact.uri if job.artifact else None,
        "artifact_sha256": job.artifact.sha256 if job.artifact else None,
    }


def _embeds(name: str) -> bool:
    """Whether jobs of the task type ``name`` store an embedding (exported as a vector)."""
    task = tasks.registry().get(name)
    return task is not None and task.embeds


def _typed(value: Any, column: Column) -> Any:
    """A result's value as its column's type: text as text, a score as a float (None where
    it is neither)."""
    if column.kind == "string":
        return _text(value)
    if column.kind == "float":
        return _score(value)
    return value


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _score(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# ---- the formats ---------------------------------------------------------------------------


def format_for(path: str, given: str | None) -> str:
    """The format: ``given``, else the one FILE's extension names. InputError if neither."""
    if given is not None:
        if given not in FORMATS:
            raise InputError(f"unknown format {given!r}; choose one of {', '.join(FORMATS)}")
        return given
    ext = os.path.splitext(path)[1].lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    named = "standard output" if path == STDOUT else path
    raise InputError(
        f"cannot tell the format of {named}: pass --format {'|'.join(FORMATS)} (or name the "
        f"file {', '.join(EXTENSIONS)})"
    )


@dataclass
class Tally:
    """What was written: rows, how many of them were not finished yet, and how many were
    cancelled (a state of its own: neither done nor failed, and finished)."""

    rows: int = 0
    unfinished: int = 0
    cancelled: int = 0

    def count(self, job: JobResult) -> JobResult:
        self.rows += 1
        if job.status == "cancelled":
            self.cancelled += 1
        elif job.status not in ("done", "failed"):
            self.unfinished += 1
        return job


def write_jsonl(jobs: Iterable[JobResult], out: TextIO, vectors: Vectors | None = None) -> None:
    for job in jobs:
        out.write(_json(json_row(job, vectors)) + "\n")


def write_csv(jobs: Iterable[JobResult], out: TextIO, columns: list[Column]) -> None:
    """A header, then one line per job. Nothing is written as empty; true/false for the
    reused flag; the finished time in ISO 8601 with its offset (+00:00)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c.name for c in columns])
    for job in jobs:
        writer.writerow([_csv_value(v) for v in flat_row(job, columns)])


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def parquet_schema(
    columns: list[Column], metadata: dict[str, str] | None = None, dim: int | None = None
) -> Any:
    """``dim``: the length of every embedding (a fixed-size list), or None (a list)."""
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "float": pa.float64(),
        "int": pa.int64(),
        "bool": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
        "vector": pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32()),
    }
    return pa.schema([pa.field(c.name, types[c.kind]) for c in columns], metadata=metadata)


def write_parquet(
    jobs: Iterable[JobResult],
    path: str,
    columns: list[Column],
    *,
    metadata: dict[str, str] | None = None,
    row_group: int = ROW_GROUP,
    vectors: Vectors | None = None,
    dim: int | None = None,
) -> None:
    """A Parquet file at ``path``, a row group every ``row_group`` jobs (only one row group's
    values are held at a time). Typed columns: strings, float64 scores, a bool ``reused``,
    ``finished`` as timestamp[us, tz=UTC] and ``attempts`` as int64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(columns, metadata, dim)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        group: list[list[Any]] = [[] for _ in columns]

        def flush() -> None:
            writer.write_batch(
                pa.RecordBatch.from_arrays(
                    [
                        pa.array(values, type=f.type)
                        for values, f in zip(group, schema, strict=True)
                    ],
                    schema=schema,
                )
            )
            for values in group:
                values.clear()

        n = 0
        for job in jobs:
            for values, value in zip(group, flat_row(job, columns, vectors), strict=True):
                values.append(value)
            n += 1
            if n % row_group == 0:
                flush()
        if n % row_group or n == 0:
            flush()  # the last, partial group; an empty export still has its schema


# ---- the destination -----------------------------------------------------------------------


def check_destination(path: str) -> None:
    """InputError, naming ``path``, if a file cannot be written there: a folder that does not
    exist, a folder in the way, a file or folder that is read-only. Checked before anything
    is read, so that a long export does not fail at its end."""
    if path == STDOUT:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: the folder {folder} does not exist (create it first)")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{path}: the file is not writable")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write in the folder {folder} (permission denied)")


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temporary file's path next to ``path``, to write; at the end it is flushed to disk and
    renamed to ``path`` (replacing it at once). On any error or interruption it is removed and
    ``path`` is left as it was. (A SIGKILL leaves the hidden ``.NAME.*.tmp`` behind, never a
    partial ``path``.)"""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise InputError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    try:
        try:  # a file replaced keeps its mode; a new one is made the usual way (not 0600)
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_export(
    jobs: Iterable[JobResult],
    fmt: str,
    path: str,
    columns: list[Column],
    *,
    metadata: dict[str, str] | None = None,
    vectors: Vectors | None = None,
    dim: int | None = None,
) -> Tally:
    """Write ``jobs`` to ``path`` (``-``: standard output, for jsonl and csv) in ``fmt``;
    ``vectors`` holds the embeddings of the jobs being written (``with_vectors``)."""
    tally = Tally()
    counted = (tally.count(job) for job in jobs)
    if path == STDOUT:
        if fmt == "parquet":
            raise InputError("parquet needs a file: pass -o FILE.parquet (not -o -)")
        _write_text(counted, fmt, sys.stdout, columns, vectors)
        sys.stdout.flush()
        return tally
    with replacing(path) as tmp:
        if fmt == "parquet":
            write_parquet(counted, tmp, columns, metadata=metadata, vectors=vectors, dim=dim)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as out:
                _write_text(counted, fmt, out, columns, vectors)
    return tally


def _write_text(
    jobs: Iterable[JobResult],
    fmt: str,
    out: TextIO,
    columns: list[Column],
    vectors: Vectors | None = None,
) -> None:
    if fmt == "jsonl":
        write_jsonl(jobs, out, vectors)
    else:
        write_csv(jobs, out, columns)


# ---- what is exported ----------------------------------------------------------------------


def latest_prefix(source: str) -> str:
    """What ``--latest SOURCE`` selects the inputs by: a folder made absolute (as the inputs
    were when submitted), or an object-store prefix (``s3://bucket/prefix``) as typed; either
    ending with "/", so that /a/b selects /a/b/x.jpg but not /a/bc.jpg."""
    if not source:
        raise InputError("--latest needs a SOURCE (a folder, or s3://bucket/prefix)")
    if is_remote(source):
        split_uri(source)  # InputError if it names no bucket
    prefix = source if "://" in source else os.path.abspath(source)
    return prefix if prefix.endswith("/") else prefix + "/"


@dataclass(frozen=True)
class Export:
    """What to write: the jobs (read when iterated), the tasks they can be of (which choose
    the columns) and a description for the file's metadata."""

    tasks: tuple[str, ...]
    jobs: Callable[[Session], Iterator[JobResult]]
    source: str
    # Where its embeddings are (embedded_models' scope): a batch, or inputs under a prefix.
    batch: str | None = None
    prefix: str | None = None


def batch_export(sessions: sessionmaker[Session], batch_id: str) -> Export:
    """Every job of ``batch_id``, in submission order. UnknownBatch if there is none."""
    with sessions() as session:
        task = get_batch(session, batch_id).task
    return Export(
        tasks=(task,),
        jobs=lambda session: iter_batch_jobs(session, batch_id, page=PAGE),
        source=f"batch {batch_id}",
        batch=batch_id,
    )


def latest_export(prefix: str, *, task: str | None = None, model: str | None = None) -> Export:
    """The current result per input under ``prefix`` (``iter_latest_jobs``)."""
    return Export(
        tasks=(task,) if task else tasks.names(),
        jobs=lambda session: iter_latest_jobs(session, prefix, task=task, model=model, page=PAGE),
        source=" ".join(
            [
                f"latest {prefix}",
                *([f"task {task}"] if task else []),
                *([f"model {model}"] if model else []),
            ]
        ),
        prefix=prefix,
    )


def run_export(
    sessions: sessionmaker[Session],
    export: Export,
    fmt: str,
    path: str,
    *,
    labels: int = DEFAULT_LABELS,
) -> Tally:
    """Write ``export`` to ``path`` in ``fmt``; returns what was written."""
    columns = columns_for(export.tasks, labels)
    if fmt == "csv":
        columns = [c for c in columns if c.kind != "vector"]
    metadata = {
        "pixelmill.export": export.source,
        "pixelmill.exported_at": datetime.now(UTC).isoformat(),
    }
    vectors: Vectors = {}
    dim = None
    embedded = any(_embeds(name) for name in export.tasks) and fmt != "csv"
    if embedded:
        with sessions() as session:
            dims = {e.dim for e in embedded_models(session, batch=export.batch,
                                                   source=export.prefix)}  # fmt: skip
        dim = dims.pop() if len(dims) == 1 else None
    with sessions() as session, sessions() as lookups:
        jobs = export.jobs(session)
        if embedded:
            jobs = with_vectors(lookups, jobs, vectors)
        return write_export(jobs, fmt, path, columns, metadata=metadata, vectors=vectors,
                            dim=dim)  # fmt: skip


def with_vectors(
    session: Session, jobs: Iterable[JobResult], vectors: Vectors, page: int = PAGE
) -> Iterator[JobResult]:
    """``jobs`` as they come, with ``vectors`` holding the embeddings of the embed jobs of
    the page being yielded (read a page at a time: memory does not grow with the export)."""
    buffered: list[JobResult] = []

    def pages() -> Iterator[list[JobResult]]:
        for job in jobs:
            buffered.append(job)
            if len(buffered) == page:
                yield buffered
        if buffered:
            yield buffered

    for chunk in pages():
        vectors.clear()
        wanted = [j.job for j in chunk if _embeds(j.task) and j.status == "done"]
        found = job_embeddings(session, wanted) if wanted else {}
        vectors.update({job_id: vector.tolist() for job_id, vector in found.items()})
        yield from list(chunk)
        chunk.clear()
