"""What the dashboard shows, read from the database, the broker and the object store: plain
functions returning JSON-ready dicts (and JPEG bytes for thumbnails). They block, so the server
runs them in its thread pool, never on its event loop. Nothing here returns a setting: the JSON
the server writes is masked once more on its way out (``Reader.mask``)."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from pixelmill.catalog import STORED_INPUT, job_path
from pixelmill.db.fleet import list_workers
from pixelmill.db.reads import (
    batch_failures,
    batch_jobs_page,
    find_batches,
    finished_per_minute,
    get_batch,
    job_source,
)
from pixelmill.db.records import BatchCounts, JobResult, WorkerReport
from pixelmill.db.schema import JobStatus
from pixelmill.db.sources import S3Inputs, is_remote
from pixelmill.db.store import ObjectStore, open_store
from pixelmill.errors import InputError
from pixelmill.producer.client import Client
from pixelmill.producer.export import batch_export, run_export
from pixelmill.producer.output import FORMATS, counts_json, failures_json
from pixelmill.settings import Settings, mask_secrets
from pixelmill.wire import PRIORITIES, queue_lengths

#: What a batch can be filtered by besides its id, name, task and model.
BATCH_STATES = ("queued", "running", "paused", "finished", "cancelled")
JOB_STATES = tuple(s.value for s in JobStatus)
ACTIONS = ("pause", "resume", "cancel", "retry", "priority")

THUMB_SIDE = 256  # pixels, the longer side
THUMB_MAX_BYTES = 64 << 20  # an input file larger than this gets the placeholder
THUMB_MAX_PIXELS = 64_000_000  # an image with more pixels gets the placeholder
THUMB_CACHE = 512  # thumbnails kept in memory
SPARK_MINUTES = 30  # a worker's items/s chart: its last minutes
STATE_SCAN = 500  # filtering by state looks among this many of the newest batches
THROUGHPUT_SECONDS = 5.0  # a running batch's throughput chart is read again after this long


# The JSON keys whose values are free text that may quote a setting (an error message).
FREE_TEXT = frozenset({"error", "reason", "message", "errors"})


class Reader:
    """The dashboard's reads and actions on one database, broker and object store."""

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self.settings = settings
        self.client = client or Client(settings)  # a fresh install: an empty database
        self._store: ObjectStore | None = None
        self._s3: S3Inputs | None = None
        self._broker = threading.Lock()  # one broker read at a time
        self._thumbs: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._search_lock = threading.Lock()
        self._minutes: dict[str, tuple[Any, float, list[tuple[int, int]]]] = {}
        self._secrets = [
            s
            for s in (
                settings.s3_secret_access_key.get_secret_value()
                if settings.s3_secret_access_key
                else None,
            )
            if s
        ]

    def close(self) -> None:
        self.client.close()

    def search(
        self, query: str, batch: str | None = None, source: str | None = None, limit: int = 48
    ) -> dict[str, Any]:
        """The search box: embedded images nearest ``query`` (the model's text tower runs in
        this process, loaded on the first search; one search at a time)."""
        with self._search_lock:
            hits = self.client.search(query, batch=batch, source=source, limit=limit)
        return {"query": query, "hits": [h.to_json() for h in hits]}

    def mask_data(self, data: Any, key: str | None = None) -> Any:
        """``data`` (what a JSON response holds) with secrets masked, the last step before it
        is sent: any URL's password everywhere, and in free text (errors and failure reasons,
        where a service's message may quote its settings) every password of the configured
        URLs and the S3 secret too. Data is never masked for merely containing a secret's
        text: a password that is also a word (a queue name, a task) leaves it intact."""
        if isinstance(data, dict):
            return {k: self.mask_data(v, k) for k, v in data.items()}
        if isinstance(data, list):
            return [self.mask_data(v, key) for v in data]
        if isinstance(data, str):
            return self.mask(data) if key in FREE_TEXT else mask_secrets(data)
        return data

    def mask(self, text: str) -> str:
        """``text`` (an error, a log line) with every password of the configured URLs, the S3
        secret and any URL's password masked."""
        text = mask_secrets(
            text, self.settings.resolved_database_url(), self.settings.resolved_broker_url()
        )
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # ---- fleet -------------------------------------------------------------------------------

    def fleet(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        with self.client.sessions() as session:
            workers = list_workers(session)
        queue: dict[str, int] = {}
        error = None
        try:
            with self._broker:
                queue = queue_lengths(self.client.app, self.settings.queue)
        except Exception as exc:  # noqa: BLE001 - kombu and redis raise many kinds
            error = f"cannot read the queue: {exc}"
        return {
            "now": now.isoformat(),
            "workers": [_worker_json(w, now) for w in workers],
            "queue": {"name": self.settings.queue, "by_priority": queue, "error": error},
        }

    # ---- batches -----------------------------------------------------------------------------

    def batches(self, limit: int = 50, match: str | None = None) -> dict[str, Any]:
        match = (match or "").strip() or None
        with self.client.sessions() as session:
            if match is not None and match.lower() in BATCH_STATES:
                wanted = match.lower()
                found = find_batches(session, STATE_SCAN)
                found = [b for b in found if b.state == wanted][:limit]
            else:
                found = find_batches(session, limit, match)
        return {"batches": [batch_json(b) for b in found]}

    def batch(self, batch_id: str) -> dict[str, Any]:
        with self.client.sessions() as session:
            batch = get_batch(session, batch_id)  # UnknownBatch: 404
            options = dict(batch.options or {})
            counts = find_batches(session, 1, only=batch_id)[0]
            failed = counts.by_status.get("failed")
            found = batch_failures(session, batch_id) if failed else None
            minutes = self._throughput(session, counts)
        data = batch_json(counts)
        data["options"] = options
        data.update(failures_json(found))
        data["throughput"] = throughput(minutes)
        return data

    def _throughput(self, session: Session, counts: BatchCounts) -> list[tuple[int, int]]:
        """``finished_per_minute``, read again at most every THROUGHPUT_SECONDS (a chart in
        minutes), and never again for a batch whose counts have not changed."""
        now = time.monotonic()
        snapshot = tuple(sorted(counts.by_status.items()))
        with self._cache_lock:
            cached = self._minutes.get(counts.batch_id)
        if cached is not None and (cached[0] == snapshot or now - cached[1] < THROUGHPUT_SECONDS):
            return cached[2]
        minutes = finished_per_minute(session, counts.batch_id)
        with self._cache_lock:
            self._minutes[counts.batch_id] = (snapshot, now, minutes)
            while len(self._minutes) > 256:
                self._minutes.pop(next(iter(self._minutes)))
        return minutes

    def jobs(
        self,
        batch_id: str,
        *,
        offset: int = 0,
        limit: int = 60,
        status: str | None = None,
        after: int | None = None,
        before: int | None = None,
    ) -> dict[str, Any]:
        """A page of the batch's jobs: at ``offset``, or (``after``/``before``: a job's
        ``seq``) the page after or before a job, found by key whatever the offset; ``offset``
        then only says where the page is, for its label."""
        if status is not None and status not in JOB_STATES:
            raise InputError(f"status must be one of {', '.join(JOB_STATES)}, not {status!r}")
        offset, limit = max(0, offset), max(1, min(limit, 500))
        with self.client.sessions() as session:
            page = batch_jobs_page(session, batch_id, offset=offset, limit=limit, status=status,
                                   after=after, before=before)  # fmt: skip
        return {"offset": offset, "limit": limit, "jobs": [job_json(j) for j in page]}

    # ---- control -----------------------------------------------------------------------------

    def act(self, batch_id: str, action: str, priority: Any = None) -> dict[str, Any]:
        """Pause, resume, cancel, retry (the failed jobs) or reprioritise the batch, through
        the same ``Client`` methods as the command line."""
        client = self.client
        with self.client.sessions() as session:
            get_batch(session, batch_id)  # UnknownBatch (404) first
        result: dict[str, Any] = {"batch": batch_id, "action": action}
        if action == "pause":
            result["changed"] = client.pause(batch_id)
        elif action == "resume":
            result["queued"] = client.resume(batch_id)
        elif action == "cancel":
            result["cancelled"] = client.cancel(batch_id)
        elif action == "retry":
            result["retried"] = client.retry(batch_id)
        elif action == "priority":
            if not isinstance(priority, str) or priority not in PRIORITIES:
                raise InputError(f"priority must be one of high, normal, low, not {priority!r}")
            result["priority"] = priority
            result["requeued"] = client.set_priority(batch_id, priority)
        else:
            raise InputError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        result["status"] = batch_json(client.status(batch_id))
        return result

    def export(self, batch_id: str, fmt: str) -> Path:
        """The batch exported in ``fmt`` to a temporary file (the caller sends and deletes it)."""
        if fmt not in FORMATS:
            raise InputError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        export = batch_export(self.client.sessions, batch_id)
        fd, name = tempfile.mkstemp(prefix="pixelmill-export-", suffix=f".{fmt}")
        os.close(fd)
        try:
            run_export(self.client.sessions, export, fmt, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return Path(name)

    # ---- thumbnails --------------------------------------------------------------------------

    def thumbnail(self, job_id: str, kind: str = "auto") -> bytes | None:
        """A small JPEG of the job's generated image (``auto``: when it has one) or of its
        input; None when there is nothing to show (unknown job, a prompt, a file missing,
        unreadable, too large or not an image): the caller sends the placeholder."""
        key = (job_id, kind)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = self._source_bytes(job_id, kind)
        thumb = make_thumbnail(data) if data is not None else None
        if thumb is not None:
            with self._thumbs_lock:
                self._thumbs[key] = thumb
                while len(self._thumbs) > THUMB_CACHE:
                    self._thumbs.popitem(last=False)
        return thumb

    def _source_bytes(self, job_id: str, kind: str) -> bytes | None:
        with self.client.sessions() as session:
            found = job_source(session, job_id)
        if found is None:
            return None
        job_input, params, artifact = found
        try:
            if artifact is not None and kind != "input":
                return self.store.get(artifact)
            if kind == "artifact":
                return None
            if "prompt" in params and job_input == params["prompt"]:
                return None  # text-to-image: the input is a prompt, not a file
            if isinstance(params.get(STORED_INPUT), str):  # uploaded: in the object store
                return self.store.get(params[STORED_INPUT])
            if is_remote(job_input):
                return self.s3.fetch(job_input, max_bytes=THUMB_MAX_BYTES).data
            return _read_file(job_path(job_input, params))
        except Exception:  # noqa: BLE001 - any failure to fetch shows the placeholder
            return None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.settings.resolved_store_url(), self.settings)
        return self._store

    @property
    def s3(self) -> S3Inputs:
        if self._s3 is None:
            self._s3 = S3Inputs(self.settings)
        return self._s3


def _read_file(path: str) -> bytes | None:
    """A regular file's bytes, if it is one and not too large (no FIFO, device or folder)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > THUMB_MAX_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(THUMB_MAX_BYTES + 1)
    finally:
        os.close(fd)


def make_thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes | None:
    """``data`` (an image file's bytes) as a JPEG at most ``side`` pixels on its longer side,
    upright (EXIF orientation), transparency on white; None if it is not an image Pillow
    decodes or has more than THUMB_MAX_PIXELS pixels."""
    from PIL import Image, ImageOps

    import pixelmill.models.images  # noqa: F401 - registers HEIC/HEIF and orders AVIF first

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > THUMB_MAX_PIXELS or width < 1 or height < 1:
                return None
            im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
            im.load()
            shown = ImageOps.exif_transpose(im)
            shown.thumbnail((side, side))
            if shown.mode in ("RGBA", "LA", "PA") or "transparency" in shown.info:
                rgba = shown.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                shown = flat
            out = io.BytesIO()
            shown.convert("RGB").save(out, "JPEG", quality=80)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - corrupt, truncated, unknown format, a decoder error
        return None


_PLACEHOLDER: bytes | None = None


def placeholder() -> bytes:
    """A plain grey JPEG: what a thumbnail that cannot be made shows."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (THUMB_SIDE, THUMB_SIDE), (224, 224, 224)).save(out, "JPEG", quality=70)
        _PLACEHOLDER = out.getvalue()
    return _PLACEHOLDER


# ---- JSON shapes ---------------------------------------------------------------------------


def batch_json(counts: BatchCounts) -> dict[str, Any]:
    """A batch as ``pixelmill status --json`` gives it (``counts_json``): counts per state,
    reused, items/s, ETA, its state (queued, running, paused, finished, cancelled) and priority."""
    data = counts_json(counts)
    data.setdefault("state", counts.state)
    data.setdefault("priority", counts.priority)
    return data


def job_json(job: JobResult) -> dict[str, Any]:
    """A job for the contact sheet: its input, state, error, and what it found (the top
    labels, the caption, or the prompt and seed of a generated image)."""
    result = job.result or {}
    return {
        "job": job.job,
        "seq": job.seq,
        "input": job.input,
        "status": job.status,
        "error": job.error,
        "reused": job.reused,
        "labels": [
            {"label": str(x.get("label")), "score": x.get("score")}
            for x in (result.get("labels") or [])[:3]
            if isinstance(x, dict)
        ],
        "caption": result.get("caption"),
        "prompt": result.get("prompt"),
        "seed": result.get("seed"),
        "artifact": job.artifact is not None,
        "device": job.device,
    }


def _worker_json(w: WorkerReport, now: datetime) -> dict[str, Any]:
    # As of the worker's last report: its counts are that old.
    seconds = (w.heartbeat_at or now).timestamp()
    minute_now = int(seconds) // 60
    per_minute = dict(w.recent)
    # Items/s per minute over the last SPARK_MINUTES, oldest first, the current minute last:
    # what it finished so far over the part of it that has passed (at least 10 s of it).
    into = max(10.0, seconds - minute_now * 60)
    series = [round(per_minute.get(m, 0) / 60, 3)
              for m in range(minute_now - SPARK_MINUTES + 1, minute_now)]  # fmt: skip
    series.append(round(per_minute.get(minute_now, 0) / into, 3))
    # Over the 60 s before the report: that minute's items so far and the rest of the one
    # before.
    last = per_minute.get(minute_now, 0) + per_minute.get(minute_now - 1, 0) * (1 - into / 60)
    age = (now - w.heartbeat_at).total_seconds() if w.heartbeat_at else None
    return {
        "name": w.name,
        "host": w.host,
        "device": w.device,
        "pid": w.pid,
        "state": w.state,
        "models": list(w.models),
        "batch": w.batch_id,
        "items": w.items,
        "items_per_second": round(last / 60, 3),
        "recent": series,
        "heartbeat_age": round(age, 1) if age is not None else None,
        "memory_used": w.memory_used,
        "memory_total": w.memory_total,
        "utilization": w.utilization,
    }


MAX_POINTS = 240  # a throughput chart's points at most


def throughput(minutes: list[tuple[int, int]]) -> dict[str, Any]:
    """Jobs finished per minute over the batch's life, minutes with none filled in with 0; a
    longer life is shown in wider steps (``step`` minutes each, ``per_minute`` the average)."""
    if not minutes:
        return {"start": None, "step": 1, "per_minute": []}
    first, last = minutes[0][0], minutes[-1][0]
    step = max(1, -(-(last - first + 1) // MAX_POINTS))
    buckets = [0] * ((last - first) // step + 1)
    for minute, n in minutes:
        buckets[(minute - first) // step] += n
    return {
        "start": datetime.fromtimestamp(first * 60, UTC).isoformat(),
        "step": step,
        "per_minute": [round(n / step, 2) for n in buckets],
    }
