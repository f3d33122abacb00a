"""`pixelmill bench-queue`: what a batch's size costs the broker and the control plane, and how
a small batch fares behind a big one.

- size: for each batch size asked (default 1,000, 100,000 and 1,000,000 jobs), the batch is
  registered (one transaction, as a submit does once its inputs are hashed), its window sent,
  and the broker's memory (Redis ``used_memory``) and messages read; then the batch is
  cancelled, timed to its first commit (from which no job of it starts) and to its last
  queued job ended. Redis holds the window whatever the size;
- fair share: with the null model on local workers, a small batch alone, then the same small
  batch submitted behind a big one of the same priority (the big one running): the small one's
  time from submit to its last result both ways, their ratio, the target (2 x alone + the time
  of one message per worker), and the big batch's rate before and while the small one runs.

Everything runs on a private embedded broker and SQLite database in a temporary folder.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from pixelmill.settings import load_settings
from pixelmill.worker.devices import cpu_workers


def _register(client: Any, path: str, n: int, size: int) -> tuple[str, float]:
    """A batch of ``n`` jobs over ``path`` registered and its window sent; its id and the
    seconds that took."""
    from pixelmill.db.jobs import create_batch
    from pixelmill.wire import enqueue

    started = time.perf_counter()
    with client.sessions.begin() as session:
        new = create_batch(session, task="classify", model="null", inputs=[path] * n,
                           message_size=size, window=client.settings.window)  # fmt: skip
    enqueue(client.app, new.job_ids, size, "normal")
    return new.batch_id, time.perf_counter() - started


def sizes(client: Any, path: str, counts: Sequence[int], size: int,
          say: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    """Register, measure and cancel a batch of each size in ``counts`` (no worker runs)."""
    from pixelmill.db.control import cancel_batch
    from pixelmill.producer.client import CANCEL_CHUNK
    from pixelmill.wire import broker_memory, queue_length

    rows = []
    queue = client.settings.queue
    for n in counts:
        say(f"registering {n:,} jobs")
        before = broker_memory(client.app)
        batch, took = _register(client, path, n, size)
        messages = queue_length(client.app, queue)
        grown = broker_memory(client.app) - before
        started = time.perf_counter()
        with client.sessions.begin() as session:  # the cancel's first commit: in effect
            first = cancel_batch(session, batch, seqs=range(0, CANCEL_CHUNK))
        effect_s = time.perf_counter() - started
        cancelled = first + client.cancel(batch)  # the rest, CANCEL_CHUNK at a time
        cancel_s = time.perf_counter() - started
        with client.app.connection_for_write() as conn:  # the window's messages claim nothing
            client.app.control.purge(connection=conn)
        rows.append({"jobs": n, "register_s": round(took, 2), "jobs_per_s": round(n / took),
                     "messages": messages, "redis_bytes": grown,
                     "cancel_effect_s": round(effect_s, 2), "cancel_s": round(cancel_s, 2),
                     "cancelled": cancelled})  # fmt: skip
    return rows


def _timed(client: Any, paths: list[str], size: int) -> float:
    """Seconds from the submit of ``paths`` to its last result."""
    start = time.time()
    sub = client.submit("classify", paths, model="null", batch_size=size, again=True, force=True)
    client.wait(sub.batch_id, timeout=3600, interval=0.05)
    finished = client.finished_at(sub.batch_id)
    assert finished is not None
    return float(finished.timestamp() - start)


def _rate(client: Any, batch: str, seconds: float) -> float:
    """The batch's items per second over the next ``seconds``."""
    first = client.status(batch).by_status.get("done", 0)
    time.sleep(seconds)
    return float(client.status(batch).by_status.get("done", 0) - first) / seconds


def fair_share(client: Any, paths: list[str], big: int, size: int, workers: int,
               say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """The small batch (``paths``) alone, then behind a ``big`` batch of the same priority."""
    _timed(client, paths[:size], size)  # the workers have loaded the model
    say(f"a {len(paths)}-job batch alone")
    alone = min(_timed(client, paths, size) for _ in range(3))
    say(f"a {big:,}-job batch, then the {len(paths)}-job batch behind it")
    batch, _ = _register(client, paths[0], big, size)
    while not client.status(batch).by_status.get("done"):
        time.sleep(0.05)
    before = _rate(client, batch, 3.0)
    first = client.status(batch).by_status.get("done", 0)
    started = time.monotonic()
    behind = _timed(client, paths, size)
    during = (client.status(batch).by_status.get("done", 0) - first) / (time.monotonic() - started)
    client.cancel(batch)
    message_s = size / (before / workers) if before else 0.0  # one message on one worker
    return {
        "small_jobs": len(paths),
        "big_jobs": big,
        "workers": workers,
        "small_alone_s": round(alone, 3),
        "small_behind_big_s": round(behind, 3),
        "behind_over_alone": round(behind / alone, 2),
        "target_s": round(2 * alone + message_s, 3),
        "big_ips_before": round(before),
        "big_ips_during": round(during),
    }


def run_queue_bench(
    counts: Sequence[int],
    *,
    small: int = 100,
    big: int = 100_000,
    size: int = 32,
    workers: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    from pixelmill.producer import Client
    from pixelmill.worker.local import local_cluster

    work = Path(tempfile.mkdtemp(prefix="pixelmill-bench-queue-"))
    try:
        folder = work / "images"
        folder.mkdir()
        first = folder / "img0000.png"
        Image.new("RGB", (64, 48), (10, 40, 90)).save(first)
        paths = [str(first)]
        for i in range(1, small):
            link = folder / f"img{i:04d}.png"
            link.hardlink_to(first)
            paths.append(str(link))
        specs = cpu_workers(workers)
        settings = load_settings(data_dir=work / "data")
        out: dict[str, Any] = {"window": settings.window, "batch_size": size}
        with local_cluster(settings, specs, workers=False), Client(settings) as client:
            out["sizes"] = sizes(client, paths[0], counts, size, progress)
        if big:
            with (
                local_cluster(settings, specs, log_dir=work / "logs"),
                Client(settings) as client,
            ):
                out["fair_share"] = fair_share(client, paths, big, size, len(specs), progress)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
