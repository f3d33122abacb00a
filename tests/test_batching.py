"""One batch from ids to committed outcomes, without Celery: a real database, a real model."""

from __future__ import annotations

import os

import pytest
import torch

from pixelmill.db.engine import make_engine, make_sessionmaker
from pixelmill.db.jobs import create_batch
from pixelmill.db.migrate import upgrade
from pixelmill.db.reads import iter_batch_jobs
from pixelmill.db.schema import JobStatus
from pixelmill.models.cache import ModelCache
from pixelmill.worker.batching import WorkerContext, _split_on_error, process_batch


@pytest.fixture
def ctx(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    context = WorkerContext(
        sessions=make_sessionmaker(engine),
        cache=ModelCache("cpu", top_k=5),
        device_label="cpu",
        worker_name="test@host",
    )
    yield context
    context.close()
    engine.dispose()


def _submit(ctx, inputs, model="efficientnet_lite0"):
    with ctx.sessions.begin() as s:
        return create_batch(s, task="classify", model=model, inputs=[str(p) for p in inputs])


def test_bad_files_fail_one_job_each_and_the_rest_complete(ctx, photos, bad_files):
    good = sorted(photos.iterdir())
    inputs = [good[0], bad_files["empty"], good[1], bad_files["truncated"],
              bad_files["text"], good[2], bad_files["corrupt"], good[3]]  # fmt: skip
    new = _submit(ctx, inputs)
    report = process_batch(ctx, new.job_ids)
    assert (report.claimed, report.done, report.failed) == (8, 4, 4)
    with ctx.sessions() as s:
        rows = list(iter_batch_jobs(s, new.batch_id))
    for row, path in zip(rows, inputs, strict=True):
        if path in good:
            assert row.status == JobStatus.done and len(row.result["labels"]) == 5
        else:
            assert row.status == JobStatus.failed
            assert str(path) in row.error
            assert row.result is None


def test_a_redelivered_message_does_no_work_twice(ctx, photos):
    new = _submit(ctx, sorted(photos.iterdir())[:2])
    assert process_batch(ctx, new.job_ids).done == 2
    again = process_batch(ctx, new.job_ids)
    assert again.claimed == 0


def test_a_job_started_before_runs_alone_and_each_attempt_counts_once(ctx, photos):
    """A job whose worker died (started once, never finished) is found by the claim, which is
    undone and taken again with the process to itself: its attempts go 1 -> 2, not 3, and the
    message's other jobs run too."""
    from sqlalchemy import select

    from pixelmill.db.jobs import claim_jobs
    from pixelmill.db.schema import Job

    new = _submit(ctx, sorted(photos.iterdir())[:3], model="null")
    with ctx.sessions.begin() as s:  # a worker that died after claiming the middle job
        claim_jobs(s, new.job_ids[1:2], worker="dead@host/1", device="cpu", lease=0)
    modes = []
    shared, exclusive = ctx.isolation.shared, ctx.isolation.exclusive

    def spy(mode, real):
        def enter():
            modes.append(mode)
            return real()

        return enter

    ctx.isolation.shared = spy("shared", shared)
    ctx.isolation.exclusive = spy("exclusive", exclusive)
    report = process_batch(ctx, new.job_ids)
    assert (report.claimed, report.done) == (3, 3)
    assert modes == ["shared", "exclusive"]
    with ctx.sessions() as s:
        attempts = dict(s.execute(select(Job.id, Job.attempts)).all())
    assert [attempts[j] for j in new.job_ids] == [1, 2, 1]
    # A message of first attempts only never waits for the process to itself.
    modes.clear()
    assert (
        process_batch(ctx, _submit(ctx, sorted(photos.iterdir())[:2], model="null").job_ids).done
        == 2
    )
    assert modes == ["shared"]


def test_unavailable_model_fails_its_jobs_with_the_model_name(ctx, photos, tmp_path):
    missing = tmp_path / "no-such-model"
    missing.mkdir()
    new = _submit(ctx, sorted(photos.iterdir())[:2], model=str(missing))
    report = process_batch(ctx, new.job_ids)
    assert report.failed == 2
    with ctx.sessions() as s:
        assert all(str(missing) in r.error for r in iter_batch_jobs(s, new.batch_id))


def test_bad_stored_options_fail_every_job_of_the_batch_naming_the_option(ctx, photos):
    """Options are validated once per batch, before the model loads (a producer validates
    them too; these were written past it)."""
    inputs = [str(p) for p in sorted(photos.iterdir())[:2]]
    with ctx.sessions.begin() as s:
        new = create_batch(s, task="caption", model="null", inputs=inputs,
                           options={"num_beams": 99})  # fmt: skip
    report = process_batch(ctx, new.job_ids)
    assert (report.done, report.failed) == (0, 2)
    assert ctx.cache.loads == 0
    with ctx.sessions() as s:
        rows = list(iter_batch_jobs(s, new.batch_id))
    for row, path in zip(rows, inputs, strict=True):
        assert row.status == JobStatus.failed
        assert row.error.startswith(f"{path}: invalid caption options: --num-beams: ")


def test_a_batch_is_read_and_its_options_validated_once_per_worker_not_per_message(
    ctx, photos, monkeypatch
):
    import pixelmill.worker.batching as batching

    validated = []
    real = batching.task_options
    monkeypatch.setattr(batching, "task_options", lambda *a: validated.append(a) or real(*a))
    with ctx.sessions.begin() as s:
        inputs = [str(p) for p in photos.iterdir()]
        new = create_batch(s, task="classify", model="null", inputs=inputs, message_size=1)
    for job_id in new.job_ids:  # one message per job, as a batch size of 1 sends them
        assert process_batch(ctx, [job_id]).done == 1
    assert len(validated) == 1
    assert list(ctx.batches) == [new.batch_id]  # the worker's own cache, filled by the worker
    assert ctx.batches[new.batch_id].options == {}


def test_a_failing_forward_is_split_until_only_the_poisonous_item_fails():
    calls = []

    def forward(items):
        calls.append(list(items))
        if "poison" in items:
            raise RuntimeError("boom")
        return [{"ok": x} for x in items]

    out = _split_on_error(forward, ["a", "b", "poison", "c", "d"])
    assert [o if isinstance(o, dict) else "error" for o in out] == [
        {"ok": "a"}, {"ok": "b"}, "error", {"ok": "c"}, {"ok": "d"}
    ]  # fmt: skip
    assert isinstance(out[2], RuntimeError)


def test_out_of_memory_on_a_batch_frees_other_models_and_splits_it(ctx, photos, tiny_blip):
    """A CUDA out-of-memory error cannot happen on this CPU, so the real model raises the real
    exception type when a batch is larger than 2: the worker drops the other cached model and
    splits the batch until it fits; every job ends done."""
    from pixelmill.models.classify import EfficientNetLite0

    class SmallMemory(EfficientNetLite0):
        def run(self, items, options=None):
            if len(items) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().run(items, options)

    runner = SmallMemory()
    runner.load("cpu")
    ctx.cache.get("caption", str(tiny_blip))  # another model, loaded earlier
    ctx.cache._runners[("classify", "efficientnet_lite0")] = runner
    new = _submit(ctx, sorted(photos.iterdir()) * 2)
    report = process_batch(ctx, new.job_ids)
    assert (report.done, report.failed) == (8, 0)
    assert ("caption", str(tiny_blip)) not in ctx.cache
    assert ("classify", "efficientnet_lite0") in ctx.cache


def _corpus(folder):
    """The bad-input corpus: odd but valid images, and broken ones."""
    from PIL import Image

    folder.mkdir()
    ok, bad = [], []
    gif = folder / "animated.gif"
    frames = [Image.new("P", (64, 48), i) for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50)
    ok.append(gif)
    Image.new("RGB", (80, 60), (10, 200, 30)).save(folder / "photo.webp", "WEBP")
    ok.append(folder / "photo.webp")
    for name, size in (("tall.png", (2, 6000)), ("wide.png", (6000, 2))):
        Image.new("RGB", size, (200, 0, 0)).save(folder / name)
        ok.append(folder / name)
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (64, 64), 40000).save(folder / "deep.png")
    Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(folder / "alpha.png")
    Image.new("L", (64, 64), 128).save(folder / "gray.png")
    ok += [folder / "cmyk.jpg", folder / "deep.png", folder / "alpha.png", folder / "gray.png"]
    non_utf8 = folder / os.fsdecode(b"caf\xe9.jpg")
    Image.new("RGB", (64, 64), (5, 5, 5)).save(non_utf8, "JPEG")
    ok.append(non_utf8)
    # Just over Pillow's pixel limit (1-bit, so the file and the test stay small).
    over = folder / "over-limit.png"
    side = int((Image.MAX_IMAGE_PIXELS or 0) ** 0.5) + 10
    Image.new("1", (side, side)).save(over)
    bad.append(over)
    png = folder / "truncated.png"
    Image.effect_noise((128, 128), 50).save(png)
    png.write_bytes(png.read_bytes()[:-400])
    bad.append(png)
    (folder / "dir.jpg").mkdir()
    bad.append(folder / "dir.jpg")
    (folder / "unreadable.jpg").symlink_to(folder / "gone.jpg")  # cannot be opened
    bad.append(folder / "unreadable.jpg")
    return ok, bad


def test_bad_input_corpus_each_done_or_failed_naming_its_file(ctx, photos, tmp_path):
    ok, bad = _corpus(tmp_path / "corpus")
    good = sorted(photos.iterdir())
    inputs = [*ok, *bad, *good]
    from pixelmill.producer.inputs import JobPlan, storable

    plan = storable(JobPlan(inputs=[str(p) for p in inputs]))
    with ctx.sessions.begin() as s:
        new = create_batch(s, task="classify", model="efficientnet_lite0", inputs=plan.inputs,
                           params=plan.params)  # fmt: skip
    report = process_batch(ctx, new.job_ids)
    assert (report.done, report.failed) == (len(ok) + len(good), len(bad))
    with ctx.sessions() as s:
        rows = list(iter_batch_jobs(s, new.batch_id))
    for row, path in zip(rows, inputs, strict=True):
        if path in bad:
            assert row.status == JobStatus.failed
            assert os.fsencode(path).decode("utf-8", "backslashreplace") in (row.error or "")
        else:
            assert row.status == JobStatus.done, row.error
            assert len(row.result["labels"]) == 5
    assert rows[ok.index(ok[-1])].input.endswith("caf\\xe9.jpg")


def test_the_corpus_keeps_a_worker_small(tmp_path):
    """In a fresh process (peak memory is per process): preparing every corpus file for the
    model, three times over, raises peak memory by little. A 2x6000 strip resized before
    the centre cut alone took 623 MiB."""
    import subprocess
    import sys

    ok, bad = _corpus(tmp_path / "corpus")
    script = (
        "import resource, sys\n"
        "from pixelmill.tasks.classify import ClassifyOptions\n"
        "from pixelmill.models.classify import EfficientNetLite0\n"
        "from pixelmill.errors import BadInput\n"
        "r = EfficientNetLite0()\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for _ in range(3):\n"
        "    for path in sys.argv[1:]:\n"
        "        try:\n"
        "            r.prepare(path, {}, ClassifyOptions())\n"
        "        except BadInput:\n"
        "            pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *map(str, [*ok, *bad])],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    grown_mib = int(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 128, f"peak memory grew by {grown_mib} MiB"
