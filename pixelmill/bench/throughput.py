"""`pixelmill bench`: throughput measured against its limits, side by side in one run.

- model_only: the model alone, on items prepared beforehand and already on the device (same
  runner, model, batch size and precision) -- the ceiling;
- e2e: files on disk -> submit -> Redis -> worker process(es) -> decode -> model -> results in
  the database, timed from the submit to the last committed result (models already loaded);
- naive: the same end to end with one Celery task per image and batch size 1;
- null: end to end with the null model (reads the file, returns nothing): the cost of queue,
  database and I/O alone, and the same with one worker when several are asked for;
- celery_noop: plain Celery no-op tasks on the same broker and workers.

Everything runs on a private embedded broker and SQLite database in a temporary folder, so a
bench never touches the configured services or their data.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixelmill import tasks
from pixelmill.settings import device_batch_size, load_settings
from pixelmill.tasks import task_options
from pixelmill.worker.devices import cpu_workers

NULL_ITEMS = 16384
RANDOM_CLIP_B32 = "clip_vit_b32_random"  # pixelmill.models.clip (not imported: torch)
PROMPTS = ["a lighthouse at dusk", "a red bicycle", "a bowl of fruit", "a city street at night"]
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "astronaut.png"]


@dataclass(frozen=True)
class BenchConfig:
    task: str = "classify"
    model: str | None = None
    device: str = "cpu"  # cpu, or cuda:N
    images: int = 256
    batch_size: int | None = None
    workers: int | None = None  # CPU worker processes (None: as `pixelmill worker`)
    image_size: tuple[int, int] = (640, 480)
    naive_images: int | None = None  # default: images
    noop_tasks: int = 2000
    repeat: int = 3  # each measure this many times; figures are medians
    options: tuple[tuple[str, Any], ...] = ()
    with_dashboard: bool = False  # end to end plain and observed (``bench_dashboard``) only

    @property
    def model_name(self) -> str:
        """The model asked for; else the task's default, except where that cannot be had
        offline: embed and zero-shot classify (``--labels``) take the random-weight CLIP
        ViT-B/32, the real model's compute."""
        if self.model:
            return self.model
        if tasks.get(self.task).embeds or dict(self.options).get("labels"):
            return RANDOM_CLIP_B32
        return tasks.get(self.task).default_model

    @property
    def size(self) -> int:
        return self.batch_size or tasks.get(self.task).default_batch_size


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def make_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` JPEG files of ``size`` made from real photographs (scikit-image's samples)."""
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    sources = [Image.open(data / name).convert("RGB").resize(size) for name in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:06d}.jpg"
        sources[i % len(sources)].save(path, quality=90)
        paths.append(path)
    return paths


class Bench:
    def __init__(self, cfg: BenchConfig, work: Path, progress: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.work = work
        self.say = progress
        self.options = dict(cfg.options)
        self.workers = (cfg.workers or len(cpu_workers())) if cfg.device == "cpu" else 1
        generate = tasks.get(cfg.task).takes_prompts
        self.paths = [] if generate else make_jpegs(work / "images", cfg.images, cfg.image_size)
        # The null and no-op measures are fast: give them enough items to time well (more
        # names for the same files, as hard links).
        self.null_items = max(cfg.images, NULL_ITEMS)
        for i in range(len(self.paths), 0 if generate else self.null_items):
            link = work / "images" / f"link{i:06d}.jpg"
            os.link(self.paths[i % cfg.images], link)
            self.paths.append(link)

    # ---- the workload: the same n items for every measure -------------------------------

    def submit(self, client: Any, n: int, *, model: str, batch_size: int) -> str:
        if tasks.get(self.cfg.task).takes_prompts:
            sub = client.submit(self.cfg.task, prompts=prompts(n), seed=0, model=model, again=True,
                                batch_size=batch_size, options=self.options)  # fmt: skip
        else:
            # force: every measure processes its items (classify and caption would otherwise
            # take the results of an earlier measure over the same files, at submit).
            sub = client.submit(self.cfg.task, [str(p) for p in self.paths[:n]], model=model,
                                batch_size=batch_size, options=self.options,
                                again=True, force=True)  # fmt: skip
        return str(sub.batch_id)

    def timed(
        self,
        client: Any,
        n: int,
        *,
        model: str,
        batch_size: int,
        on_submit: Callable[[str], None] | None = None,
    ) -> float:
        """Items per second for n items, from the submit to the last result committed (as the
        workers timestamp it: the bench polls the database rarely, to take no CPU from them).
        ``on_submit(batch_id)`` runs after the submit; its own time is not counted."""
        start = time.time()
        batch = self.submit(client, n, model=model, batch_size=batch_size)
        if on_submit is not None:
            before = time.time()
            on_submit(batch)
            start += time.time() - before
        counts = client.wait(batch, timeout=24 * 3600, interval=0.25)
        finished = client.finished_at(batch)
        if counts.by_status.get("done") != n or finished is None:
            failures = client.failures(batch)
            raise RuntimeError(f"bench batch did not complete: {counts.by_status} {failures}")
        return float(n / (finished.timestamp() - start))

    # ---- measures --------------------------------------------------------------------

    def model_only(self) -> tuple[float, str]:
        """The model alone, configured as the workers run it: on the CPU, one process per
        worker with its share of the threads, all at once (their rates add up)."""
        cfg = self.cfg
        device = cfg.device if cfg.device == "cpu" else "cuda:0"
        specs = cpu_workers(self.workers) if device == "cpu" else [None]
        args: dict[str, Any] = {
            "task": cfg.task,
            "model": cfg.model_name,
            "device": device,
            "options": dict(self.options),
            "forward_batch": self.forward_batch,
        }
        if len(specs) == 1:
            return _model_only(**args, inputs=self.inputs(), threads=None, barrier=None)
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(len(specs))
        results = ctx.Queue()
        shares = [self.inputs()[i :: len(specs)] for i in range(len(specs))]
        procs = [
            ctx.Process(
                target=_model_only_child,
                args=(results, args, share, spec.threads if spec else None, barrier),
            )
            for spec, share in zip(specs, shares, strict=True)
        ]
        for proc in procs:
            proc.start()
        rates = [results.get(timeout=3600) for _ in procs]
        for proc in procs:
            proc.join()
        return sum(rate for rate, _ in rates), rates[0][1]

    def inputs(self) -> list[str]:
        if tasks.get(self.cfg.task).takes_prompts:
            return prompts(self.cfg.images)
        return [str(p) for p in self.paths[: self.cfg.images]]

    @property
    def forward_batch(self) -> int:
        """The forward pass the workers run: the message's batch, split per device."""
        device = self.cfg.device if self.cfg.device == "cpu" else "cuda:0"
        return min(self.cfg.size, device_batch_size(load_settings(), device) or self.cfg.size)

    def noop_tps(self, client: Any) -> float:
        """Plain Celery no-op tasks per second: n no-ops, then one null job behind them in the
        same queue; when that job is done, the no-ops before it have run."""
        from pixelmill.wire import NOOP

        n = self.cfg.noop_tasks
        start = time.time()
        with client.app.producer_or_acquire() as producer:
            for _ in range(n):
                client.app.send_task(NOOP, producer=producer)
        batch = self.submit(client, 1, model="null", batch_size=1)
        client.wait(batch, timeout=3600, interval=0.25)
        finished = client.finished_at(batch)
        assert finished is not None
        return float(n / (finished.timestamp() - start))

    @contextmanager
    def cluster(self, workers: int) -> Iterator[Any]:
        from pixelmill.producer import Client
        from pixelmill.worker.devices import DeviceSpec, parse_devices
        from pixelmill.worker.local import local_cluster

        cfg = self.cfg
        specs: list[DeviceSpec] = (
            cpu_workers(workers) if cfg.device == "cpu" else parse_devices(cfg.device)
        )
        settings = load_settings(data_dir=self.work / f"data-{workers}")
        with (
            local_cluster(settings, specs, log_dir=self.work / "logs") as _,
            Client(settings) as client,
        ):
            yield client

    def run(self) -> dict[str, Any]:
        """Each measure ``repeat`` times, in interleaved rounds (so that a noisy moment of the
        machine does not fall on one measure only); the figures are the medians."""
        cfg = self.cfg
        n = cfg.images
        runs: dict[str, list[float]] = {}
        messages = -(-n // cfg.size)
        if messages < self.workers:
            self.say(f"note: {n} items at batch size {cfg.size} make {messages} message(s) for "
                     f"{self.workers} workers, so end to end leaves workers idle; use more "
                     "--images or a smaller --batch-size")  # fmt: skip

        def record(key: str, value: float) -> None:
            runs.setdefault(key, []).append(value)

        precision = "fp32"
        for round_ in range(0 if cfg.with_dashboard else cfg.repeat):
            self.say(f"model only ({round_ + 1}/{cfg.repeat})")
            ips, precision = self.model_only()
            record("model_only_ips", ips)
        with self.cluster(self.workers) as client:
            self.say("warming up the workers")
            for model in (cfg.model_name, "null"):
                for _ in range(self.workers):
                    self.timed(client, cfg.size, model=model, batch_size=cfg.size)
            if cfg.with_dashboard:
                from pixelmill.bench.dashboard import compare

                env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
                env.update(client.settings.to_env())
                compared = compare(self, client, env, self.say)
                return {**self.settings_figures("n/a"), **compared}
            for round_ in range(cfg.repeat):
                self.say(f"end to end, naive, null, Celery no-op ({round_ + 1}/{cfg.repeat})")
                record("e2e_ips", self.timed(client, n, model=cfg.model_name, batch_size=cfg.size))
                naive_n = cfg.naive_images or n
                record("naive_ips", self.timed(client, naive_n, model=cfg.model_name, batch_size=1))
                record("null_ips", self.timed(client, self.null_items, model="null",
                                              batch_size=cfg.size))  # fmt: skip
                record("celery_noop_tps", self.noop_tps(client))
        if self.workers > 1:
            with self.cluster(1) as client:
                self.timed(client, cfg.size, model="null", batch_size=cfg.size)
                for round_ in range(cfg.repeat):
                    self.say(f"null model, one worker ({round_ + 1}/{cfg.repeat})")
                    ips = self.timed(client, self.null_items, model="null", batch_size=cfg.size)
                    record("null_ips_one_worker", ips)
        figures = {key: statistics.median(values) for key, values in runs.items()}
        return {
            **self.settings_figures(precision),
            **rounded(figures),
            **ratios(figures),
            "runs": {key: [round(v, 2) for v in values] for key, values in runs.items()},
        }

    def settings_figures(self, precision: str) -> dict[str, Any]:
        import torch

        cfg = self.cfg
        prompted = tasks.get(cfg.task).takes_prompts
        device_name = platform.processor() or platform.machine()
        if cfg.device.startswith("cuda"):
            device_name = torch.cuda.get_device_name(0)
        return {
            "task": cfg.task,
            "model": cfg.model_name,
            "device": cfg.device,
            "device_name": device_name,
            "cpu_cores": os.cpu_count(),
            "precision": precision,
            "batch_size": cfg.size,
            "forward_batch": self.forward_batch,
            "images": cfg.images,
            "null_items": self.null_items,
            "image_size": "prompts" if prompted else f"{cfg.image_size[0]}x{cfg.image_size[1]}",
            "workers": self.workers,
            "repeat": cfg.repeat,
            "options": dict(cfg.options),
            "torch": torch.__version__,
        }


def _model_only(
    *,
    task: str,
    model: str,
    device: str,
    options: dict[str, Any],
    forward_batch: int,
    inputs: list[str],
    threads: int | None,
    barrier: Any,
) -> tuple[float, str]:
    """Items per second of the model alone on ``inputs`` prepared and moved to the device
    beforehand; and the precision it ran in."""
    import torch

    from pixelmill.models.registry import create_runner, runner_kind

    if threads:
        torch.set_num_threads(threads)
    opts = task_options(task, options, model)
    runner = create_runner(runner_kind(task, opts), model)
    runner.load(device)
    items = [runner.prepare(x, {"prompt": x, "seed": i}, opts) for i, x in enumerate(inputs)]
    batches = [items[i : i + forward_batch] for i in range(0, len(items), forward_batch)]
    on_device = [runner.collate(b) for b in batches]
    runner.forward(on_device[0], opts)  # warm-up
    sync: Callable[[], None] = torch.cuda.synchronize if device.startswith("cuda") else _no_sync
    sync()
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    for batch in on_device:
        runner.forward(batch, opts)
    sync()
    return len(items) / (time.perf_counter() - start), runner.precision


def _model_only_child(
    results: Any, args: dict[str, Any], inputs: list[str], threads: int | None, barrier: Any
) -> None:
    results.put(_model_only(**args, inputs=inputs, threads=threads, barrier=barrier))


def rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in figures.items()}


def ratios(f: dict[str, float]) -> dict[str, float]:
    out = {
        "e2e_over_model_only": f["e2e_ips"] / f["model_only_ips"],
        "e2e_over_naive": f["e2e_ips"] / f["naive_ips"],
        "null_over_celery_noop": f["null_ips"] / f["celery_noop_tps"],
    }
    if "null_ips_one_worker" in f:
        out["null_scaling"] = f["null_ips"] / f["null_ips_one_worker"]
    return {k: round(v, 3) for k, v in out.items()}


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    # Bad options are a usage error here, before any process starts (BadInput).
    task_options(cfg.task, dict(cfg.options), cfg.model_name)
    work = Path(tempfile.mkdtemp(prefix="pixelmill-bench-"))
    try:
        return Bench(cfg, work, progress).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _no_sync() -> None:
    """The CPU has nothing to wait for."""
