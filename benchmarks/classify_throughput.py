"""First throughput figures for classify: end to end vs the model alone, in one run.

    .venv/bin/python benchmarks/classify_throughput.py --images 256 --batch-size 32

End to end: JPEG files on disk -> submit -> Redis -> worker process (decode, model) -> results
in SQLite, measured from submit to the last result committed, model already loaded (a warm-up
batch runs first). Model only: the same model and batch size on pre-decoded tensors.
The full benchmark (`pixelmill bench`, naive and null baselines) is issue 4.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from models.classify import EfficientNetLite0
from pixelmill.settings import load_settings
from producer import Client
from worker.local import local_cluster

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "astronaut.png"]


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


def model_only(paths: list[Path], batch_size: int) -> float:
    runner = EfficientNetLite0()
    runner.load("cpu")
    tensors = [runner.preprocess(runner.decode(str(p))) for p in paths]
    runner.run(tensors[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(tensors), batch_size):
        runner.run(tensors[i : i + batch_size])
    return len(tensors) / (time.perf_counter() - start)


def end_to_end(paths: list[Path], batch_size: int, work: Path) -> float:
    settings = load_settings(data_dir=work / "data", batch_size=batch_size)
    with local_cluster(settings, "cpu", log_dir=work / "logs"), Client(settings) as pm:
        warm = pm.submit("classify", [str(p) for p in paths[:batch_size]])
        pm.wait(warm.batch_id, timeout=600, interval=0.05)
        start = time.perf_counter()
        sub = pm.submit("classify", [str(p) for p in paths])
        counts = pm.wait(sub.batch_id, timeout=1800, interval=0.05)
        elapsed = time.perf_counter() - start
        assert counts.by_status.get("done") == len(paths), counts.by_status
    return len(paths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pixelmill-bench-"))
    try:
        (work / "images").mkdir()
        paths = make_jpegs(work / "images", args.images)
        e2e = end_to_end(paths, args.batch_size, work)
        alone = model_only(paths, args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "task": "classify",
        "model": "efficientnet_lite0",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "images": args.images,
        "image_size": "640x480 JPEG",
        "batch_size": args.batch_size,
        "e2e_ips": round(e2e, 1),
        "model_only_ips": round(alone, 1),
        "e2e_over_model_only": round(e2e / alone, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
