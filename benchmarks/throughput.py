"""Throughput of one task, end to end against the model alone, measured in one run.

    .venv/bin/python benchmarks/throughput.py classify --images 256 --batch-size 32
    .venv/bin/python benchmarks/throughput.py caption --images 128 --batch-size 16
    .venv/bin/python benchmarks/throughput.py generate --images 64 --batch-size 4

End to end: inputs -> submit -> Redis -> a worker process (decode, model, artifacts to the
store) -> results committed in SQLite; measured from submit to the last result, with the model
already loaded (a warm-up batch runs first). Model only: the same runner, model and batch size
on items prepared beforehand (decoded and preprocessed images; prompts and seeds).

caption and generate default to the tiny models the tests build (no weights can be downloaded
on the development machine); pass --model for a hub id or a local folder. The full benchmark
(`pixelmill bench`, naive and null baselines) is issue 4.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.registry import create_runner  # noqa: E402
from pixelmill.catalog import DEFAULT_MODELS, task_options  # noqa: E402
from pixelmill.settings import load_settings  # noqa: E402
from producer import Client  # noqa: E402
from worker.local import local_cluster  # noqa: E402

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "astronaut.png"]
PROMPTS = ["a lighthouse at dusk", "a red bicycle", "a bowl of fruit", "a city street at night"]


def make_jpegs(folder: Path, n: int) -> list[Path]:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    sources = [Image.open(data / name).convert("RGB").resize((640, 480)) for name in PHOTOS]
    paths = []
    for i in range(n):
        p = folder / f"img{i:05d}.jpg"
        sources[i % len(sources)].save(p, quality=90)
        paths.append(p)
    return paths


def tiny_model(task: str, work: Path) -> str:
    from tests.tiny_models import build_tiny_blip_captioner, build_tiny_stable_diffusion

    build = {"caption": build_tiny_blip_captioner, "generate": build_tiny_stable_diffusion}[task]
    return str(build(work / f"tiny-{task}"))


class Workload:
    """The same n items for both measures: image paths, or prompts with seeds."""

    def __init__(self, task: str, model: str, n: int, work: Path, options: dict[str, Any]):
        self.task, self.model, self.n, self.options = task, model, n, options
        self.paths = [] if task == "generate" else make_jpegs(work, n)

    def submit(self, client: Client, n: int) -> str:
        if self.task == "generate":
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
            sub = client.submit("generate", prompts=prompts, seed=0, model=self.model,
                                options=self.options)  # fmt: skip
        else:
            sub = client.submit(self.task, [str(p) for p in self.paths[:n]], model=self.model,
                                options=self.options)  # fmt: skip
        return sub.batch_id

    def items(self, runner: Any, options: dict[str, Any]) -> list[Any]:
        if self.task == "generate":
            return [
                runner.prepare(p, {"prompt": p, "seed": i}, options)
                for i, p in enumerate(PROMPTS[i % len(PROMPTS)] for i in range(self.n))
            ]
        return [runner.prepare(str(p), {}, options) for p in self.paths]


def model_only(load: Workload, batch_size: int) -> float:
    runner = create_runner(load.task, load.model)
    runner.load("cpu")
    options = task_options(load.task, {**load.options, "batch_size": batch_size}, load.model)
    opts = options.model_dump(mode="json", exclude_none=True)
    items = load.items(runner, opts)
    runner.run(items[:batch_size], opts)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        runner.run(items[i : i + batch_size], opts)
    return len(items) / (time.perf_counter() - start)


def end_to_end(load: Workload, batch_size: int, work: Path) -> float:
    settings = load_settings(data_dir=work / "data", batch_size=batch_size)
    with local_cluster(settings, "cpu", log_dir=work / "logs"), Client(settings) as pm:
        warm = load.submit(pm, batch_size)
        pm.wait(warm, timeout=600, interval=0.05)
        start = time.perf_counter()
        batch = load.submit(pm, load.n)
        counts = pm.wait(batch, timeout=3600, interval=0.05)
        elapsed = time.perf_counter() - start
        assert counts.by_status.get("done") == load.n, counts.by_status
    return load.n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(DEFAULT_MODELS))
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default=None, help="default: classify's own, else tiny")
    parser.add_argument("--size", default="64x64", help="generate: WxH")
    parser.add_argument("--steps", type=int, default=2, help="generate: denoising steps")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pixelmill-bench-"))
    try:
        model = args.model or (
            DEFAULT_MODELS["classify"] if args.task == "classify" else tiny_model(args.task, work)
        )
        options: dict[str, Any] = {}
        if args.task == "generate":
            width, height = (int(x) for x in args.size.lower().split("x"))
            options = {"steps": args.steps, "width": width, "height": height}
        (work / "images").mkdir()
        load = Workload(args.task, model, args.images, work / "images", options)
        e2e = end_to_end(load, args.batch_size, work)
        alone = model_only(load, args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "task": args.task,
        "model": args.model or ("efficientnet_lite0" if args.task == "classify" else "tiny"),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "items": args.images,
        "inputs": "prompts" if args.task == "generate" else "640x480 JPEG",
        **options,
        "batch_size": args.batch_size,
        "e2e_per_s": round(e2e, 1),
        "model_only_per_s": round(alone, 1),
        "e2e_over_model_only": round(e2e / alone, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
