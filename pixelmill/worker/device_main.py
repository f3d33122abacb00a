"""One device worker process: ``python -m pixelmill.worker.device_main --device cpu|cuda:N``.

Started by the supervisor (never forked from a process that touched CUDA). The supervisor pins
``CUDA_VISIBLE_DEVICES`` to the one GPU, so inside this process the device is ``cuda:0`` while
results and Flower show the physical ``cuda:N``.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pixelmill import tasks
from pixelmill.errors import PixelmillError
from pixelmill.logs import configure_logging
from pixelmill.settings import Settings, decode_threads, device_batch_size, load_settings
from pixelmill.worker.heartbeat import Heartbeat, Reporter
from pixelmill.worker.lifecycle import DRAIN_SECONDS, ParentWatch, set_parent_death_signal

if TYPE_CHECKING:
    from pixelmill.db.engine import Database
    from pixelmill.worker.batching import WorkerContext


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    # SIGUSR2 writes every thread's stack to stderr (the worker's log): the supervisor asks
    # for it before it kills a worker that did not stop in time, and so may an operator.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    if args.parent is not None and not _die_with_parent(args.parent):
        return 1
    try:
        settings = load_settings()
        tasks.registry()  # a task type an installed package adds that cannot be loaded
    except PixelmillError as exc:
        print(f"pixelmill worker: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    # No loading progress bars in worker logs (the cache logs one line per load); set before
    # transformers or diffusers are imported, and without importing them at start-up.
    os.environ.setdefault("TQDM_DISABLE", "1")
    _serve(settings, args)
    return 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pixelmill device worker")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (the physical index)")
    parser.add_argument("--slot", type=int, default=0, help="which of several CPU workers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument(
        "--gpu-workers", type=int, default=1, help="GPU workers on this host (they share its cores)"
    )
    parser.add_argument("--parent", type=int, default=None, help="die with this process")
    parser.add_argument("--ready-file", default=None, help="touched once consuming")
    return parser.parse_args(argv)


def _die_with_parent(parent: int) -> bool:
    """Before anything slow: the kernel signals us (SIGTERM: drain) when the supervisor dies,
    and a watch exits for good if draining takes too long. False if it is already gone."""
    pdeathsig = set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        return False
    ParentWatch(
        parent,
        on_orphan=None if pdeathsig else lambda: os.kill(os.getpid(), signal.SIGTERM),
        deadline=DRAIN_SECONDS,
    ).start()
    return True


def _context(
    settings: Settings, args: argparse.Namespace, holder: str
) -> tuple[WorkerContext, Database]:
    """What every batch of this process shares: its database, model cache, store, device,
    decode threads and limits (and the database, to close at the end)."""
    import torch

    from pixelmill.db.engine import configured_database
    from pixelmill.db.store import open_store
    from pixelmill.models.cache import ModelCache
    from pixelmill.models.images import configure as configure_decoding
    from pixelmill.worker.batching import MAX_INPUT_BYTES, WorkerContext

    configure_decoding(settings.decode_memory_mb)  # the decode threads' memory budget
    device = "cpu" if args.device == "cpu" else "cuda:0"
    if device == "cpu":
        torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    database = configured_database(settings)
    ctx = WorkerContext(
        sessions=database.sessions,
        cache=ModelCache(
            device,
            size=settings.model_cache_size,
            top_k=settings.top_k,
            compile=settings.compile,
            trust_remote_code=settings.trust_remote_code,
        ),
        device_label=args.device,
        worker_name=holder,
        store=open_store(settings.resolved_store_url(), settings),
        decode_threads=decode_threads(settings, device, args.gpu_workers),
        device_batch=device_batch_size(settings, device),
        lease=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        window=settings.window,
        queued_lease=settings.queued_lease_seconds,
        read_timeout=settings.read_timeout,
        stall=settings.stall_seconds,
        transient_retry=settings.transient_retry_seconds,
        settings=settings,
        max_fetch_bytes=min(settings.decode_memory_mb << 20, MAX_INPUT_BYTES),
    )
    return ctx, database


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    """Consume the queue until Celery stops (a drain), reporting this process's state, and
    close everything on the way out."""
    from celery.signals import worker_ready, worker_shutting_down

    from pixelmill.wire import create_app
    from pixelmill.worker.devices import DeviceSpec
    from pixelmill.worker.embedded import EmbeddedRedis
    from pixelmill.worker.tasks import register_tasks

    name = DeviceSpec(args.device, None, slot=args.slot).name
    node = f"pixelmill-{name}@{socket.gethostname()}"
    # Jobs are leased to this process, not to the node name: a restarted worker with the same
    # name must not renew the leases of the jobs its dead predecessor held.
    ctx, database = _context(settings, args, holder=f"{node}/{os.getpid()}")
    # A user of the embedded broker for as long as this process lives: it stays while this
    # worker drains, even after the supervisor that started it is gone.
    broker = EmbeddedRedis(settings.embedded_socket, settings.data_dir)
    if settings.embedded_broker:
        broker.hold()
    app = create_app(settings)
    register_tasks(app, ctx)
    if args.ready_file:
        ready_file = Path(args.ready_file)
        worker_ready.connect(lambda **_: ready_file.touch(), weak=False)
    # This process's row in the workers table (the dashboard's fleet, the metrics): written
    # now, at every heartbeat, and when it stops. Off the signal handler, in a thread.
    device = "cpu" if args.device == "cpu" else "cuda:0"
    reporter = Reporter(ctx, name=node, label=args.device, device=device)
    worker_ready.connect(lambda **_: _report_soon(reporter, "idle"), weak=False)
    worker_shutting_down.connect(lambda **_: _report_soon(reporter, "stopping"), weak=False)
    reporter.try_report("starting")
    heartbeat = Heartbeat(ctx, settings.lease_seconds / 4, reporter)
    heartbeat.start()
    logging.getLogger("pixelmill.worker").info(
        "device worker %s starting on %s (pid %d)", node, args.device, os.getpid()
    )
    try:
        app.worker_main(_celery_argv(settings, node))
    finally:
        broker.stop(timeout=0)
        heartbeat.stop()
        ctx.close()
        heartbeat.join(timeout=5)  # its last report is not written after this one
        reporter.try_report("stopped")
        database.dispose()


def _celery_argv(settings: Settings, node: str) -> list[str]:
    """Celery's worker, quiet: neither its banner nor its warning about root, in each device
    worker's log or on the supervisor's stderr (the supervisor's header names the processes
    and their threads, and says once that it runs as root; messages are JSON only: no pickle,
    which is what makes root dangerous to Celery, and which Celery itself refuses as root)."""
    from celery.exceptions import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning)
    return [
        "--quiet",
        "worker",
        "--pool=threads",
        f"--concurrency={settings.pipeline_depth}",
        f"--queues={settings.queue}",
        f"--hostname={node}",
        f"--loglevel={settings.log_level}",
        "--without-mingle",
        "--without-gossip",
        "--task-events",
    ]


def _report_soon(reporter: Reporter, state: str) -> None:
    """Say ``state`` now, from a thread of its own (Celery sends its signals from the worker's
    loop and its signal handlers, which must not wait on the database)."""
    reporter.state = state
    threading.Thread(target=reporter.try_report, name="worker-report", daemon=True).start()


if __name__ == "__main__":
    code = main()
    # Everything is closed and recorded: skip the interpreter's teardown (torch's and Celery's
    # threads and modules), which took about a second of every `pixelmill run`'s exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
