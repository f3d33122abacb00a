"""Caption and generate end to end through the real parts: the CLI, Redis, worker processes,
SQLite or PostgreSQL, and the local object store; tiny models loaded from local folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from pixelmill.producer import Client
from pixelmill.settings import load_settings
from pixelmill.worker.local import local_cluster
from tests.conftest import PHOTOS, pixelmill, pixelmill_env

pytestmark = pytest.mark.slow

CONTRACT_KEYS = {"job", "input", "task", "status", "result", "error", "model", "device", "artifact",
                 "sha256", "revision", "reused", "reused_from"}  # fmt: skip


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _file(uri: str) -> Path:
    parts = urlsplit(uri)
    assert parts.scheme == "file", uri
    return Path(unquote(parts.path))


def test_caption_and_generate_on_the_embedded_default(tmp_path, photos, tiny_blip, tiny_sd):
    env = pixelmill_env(data_dir=str(tmp_path / "data"))

    cap = pixelmill("run", "caption", str(photos), "--model", str(tiny_blip), "--json",
                    "--max-new-tokens", "8", "--num-beams", "2", env=env)  # fmt: skip
    assert cap.returncode == 0, cap.stderr
    lines = _lines(cap.stdout)
    assert len(lines) == len(PHOTOS)
    for line in lines:
        assert set(line) == CONTRACT_KEYS
        assert (line["task"], line["status"], line["artifact"]) == ("caption", "done", None)
        assert set(line["result"]) == {"caption"} and line["result"]["caption"].strip()
        assert len(line["sha256"]) == 64 and line["reused"] is False
        assert line["revision"].startswith("local-")  # the tiny model's folder fingerprint

    gen = pixelmill("run", "generate", "--prompt", "a lighthouse at dusk", "--prompt",
                    "a red bicycle", "--count", "2", "--seed", "11", "--steps", "2",
                    "--size", "64x32", "--model", str(tiny_sd), "--json", env=env)  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    images = _lines(gen.stdout)
    assert [x["input"] for x in images] == ["a lighthouse at dusk"] * 2 + ["a red bicycle"] * 2
    assert [x["result"]["seed"] for x in images] == [11, 12, 13, 14]
    digests = []
    for line in images:
        assert set(line) == CONTRACT_KEYS and line["status"] == "done"
        assert line["sha256"] is None and line["reused"] is False  # a prompt: never reused
        assert {"width", "height", "seed", "steps"} <= set(line["result"])
        assert (line["result"]["width"], line["result"]["height"]) == (64, 32)
        path = _file(line["artifact"])
        assert path.is_relative_to(tmp_path / "data" / "store")
        assert line["job"] in path.name  # a server-generated key, not the prompt
        with Image.open(path) as im:
            assert (im.format, im.size) == ("PNG", (64, 32))
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(set(digests)) == 4

    # The same prompt, seed and settings on the same device: a byte-identical image.
    again = pixelmill("run", "generate", "--prompt", "a lighthouse at dusk", "--seed", "12",
                      "--steps", "2", "--size", "64x32", "--model", str(tiny_sd), "--json",
                      env=env)  # fmt: skip
    assert again.returncode == 0, again.stderr
    (repeat,) = _lines(again.stdout)
    assert hashlib.sha256(_file(repeat["artifact"]).read_bytes()).hexdigest() == digests[1]
    assert repeat["job"] != images[1]["job"]

    # Image + text -> image over each photo; --download copies the artifacts to a folder.
    out = tmp_path / "downloaded"
    i2i = pixelmill("run", "generate", "--prompt", "as a watercolor", "--init", str(photos),
                    "--strength", "0.6", "--steps", "4", "--size", "32x32", "--seed", "5",
                    "--model", str(tiny_sd), "--json", "--download", str(out),
                    env=env)  # fmt: skip
    assert i2i.returncode == 0, i2i.stderr
    painted = _lines(i2i.stdout)
    assert sorted(Path(x["input"]).name for x in painted) == sorted(PHOTOS)
    assert all(x["result"]["strength"] == 0.6 for x in painted)
    saved = sorted(out.iterdir())
    assert [p.name for p in saved] == sorted(f"{x['job']}-0.png" for x in painted)
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in saved}) == len(PHOTOS)


def test_mixed_models_in_one_queue_on_postgres_load_once_and_a_bad_model_fails_alone(
    tmp_path, photos, tiny_blip, tiny_sd, redis_server, postgres_server
):
    """One worker, one queue, batches naming different models (and one that cannot load):
    each model is loaded once, the bad one fails its jobs with a reason naming it, the rest
    completes, and `results --download` copies the artifacts."""
    db_url = postgres_server.create_database("e2e_mixed")
    settings = load_settings(
        data_dir=tmp_path / "data", broker_url=redis_server.url, database_url=db_url,
        batch_size=2,
    )  # fmt: skip
    logs = tmp_path / "logs"
    with local_cluster(settings, "cpu", log_dir=logs), Client(settings) as pm:
        cap1 = pm.submit("caption", [str(photos)], model=str(tiny_blip),
                         options={"max_new_tokens": 6})  # fmt: skip
        small = {"steps": 2, "width": 32, "height": 32}
        gen = pm.submit("generate", prompts=["a lighthouse", "a bicycle"], count=2, seed=1,
                        model=str(tiny_sd), options=small)  # fmt: skip
        missing = pm.submit("caption", [str(photos)], model="pixelmill-test/not-downloaded")
        cap2 = pm.submit("caption", [str(photos)], model=str(tiny_blip),
                         options={"max_new_tokens": 4, "num_beams": 2})  # fmt: skip
        for sub in (cap1, gen, missing, cap2):
            pm.wait(sub.batch_id, timeout=300)
        captions = [list(pm.results(s.batch_id)) for s in (cap1, cap2)]
        images = list(pm.results(gen.batch_id))
        failed = list(pm.results(missing.batch_id))
        reasons = pm.failures(missing.batch_id)
        saved = pm.download(gen.batch_id, tmp_path / "out")
    for batch in captions:
        assert [r.status for r in batch] == ["done"] * len(PHOTOS)
        assert all(r.result and r.result["caption"].strip() for r in batch)
    assert [r.status for r in images] == ["done"] * 4
    assert [r.result["seed"] for r in images if r.result] == [1, 2, 3, 4]
    assert {p.name for p in saved} == {f"{r.job}-0.png" for r in images}
    assert all(r.status == "failed" for r in failed)
    (group,) = reasons.groups
    assert group.jobs == len(PHOTOS) and "pixelmill-test/not-downloaded" in group.kind
    assert "cannot be reached from this host" in group.kind and "hf download" in group.kind
    # Each worker process loads each model at most once, however many batches name it.
    worker_logs = [p.read_text() for p in logs.glob("worker-cpu*.log")]
    for model in (f"caption/{tiny_blip}", f"generate/{tiny_sd}"):
        loads = [log.count(f"loaded {model} ") for log in worker_logs]
        assert max(loads) == 1 and sum(loads) >= 1, loads


def test_generate_into_an_s3_bucket(tmp_path, tiny_sd, s3_server):
    bucket = s3_server.create_bucket("pm-e2e-generate")
    env = pixelmill_env(
        data_dir=str(tmp_path / "data"),
        store_url=f"s3://{bucket}/pixelmill",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
    )
    out = tmp_path / "out"
    gen = pixelmill("run", "generate", "--prompt", "a lighthouse", "--count", "3", "--seed", "1",
                    "--steps", "2", "--size", "32x32", "--model", str(tiny_sd), "--json",
                    "--download", str(out), env=env)  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert s3_server.secret_key not in gen.stdout + gen.stderr
    lines = _lines(gen.stdout)
    keys = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert len(keys) == 3
    for line in lines:
        assert line["artifact"].startswith(f"s3://{bucket}/pixelmill/batches/")
        assert line["artifact"].endswith(f"/{line['job']}-0.png")
        with Image.open(out / f"{line['job']}-0.png") as im:
            assert (im.format, im.size) == ("PNG", (32, 32))
