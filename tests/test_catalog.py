"""Task options and job planning: what a submit turns into, before anything runs."""

from __future__ import annotations

import pytest

from pixelmill.catalog import parse_size
from pixelmill.errors import BadInput
from pixelmill.producer.inputs import InputError, plan_jobs
from pixelmill.tasks import task_options
from pixelmill.tasks.generate import GenerateOptions, read_prompts_file


def test_generate_plans_one_job_per_image_with_consecutive_recorded_seeds():
    plan = plan_jobs("generate", [], prompts=["a cat", "a dog"], count=2, seed=7)
    assert plan.inputs == ["a cat", "a cat", "a dog", "a dog"]
    assert plan.params == [
        {"prompt": "a cat", "seed": 7},
        {"prompt": "a cat", "seed": 8},
        {"prompt": "a dog", "seed": 9},
        {"prompt": "a dog", "seed": 10},
    ]
    random_seeds = plan_jobs("generate", [], prompts=["x"], count=3).params
    assert random_seeds is not None
    first = random_seeds[0]["seed"]
    assert [p["seed"] for p in random_seeds] == [first, first + 1, first + 2]


def test_image_to_image_plans_every_init_image_with_every_prompt():
    plan = plan_jobs("generate", ["/a.jpg", "/b.jpg"], prompts=["ink", "oil"], seed=0)
    assert plan.inputs == ["/a.jpg", "/a.jpg", "/b.jpg", "/b.jpg"]
    assert [p["prompt"] for p in plan.params or []] == ["ink", "oil", "ink", "oil"]


@pytest.mark.parametrize(
    ("task", "paths", "kwargs", "message"),
    [
        ("generate", [], {"prompts": ["  "]}, "--prompt"),
        ("generate", [], {"prompts": ["x"], "count": 0}, "--count"),
        ("generate", [], {"prompts": ["x"], "seed": -1}, "--seed"),
        ("caption", ["/a.jpg"], {"prompts": ["x"]}, "for generate"),
        ("caption", [], {}, "needs input images"),
    ],
)
def test_misused_job_arguments_are_input_errors(task, paths, kwargs, message):
    with pytest.raises(InputError, match=message):
        plan_jobs(task, paths, **kwargs)


def test_prompts_file_skips_blank_lines(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a lighthouse at dusk\n\n  a red bicycle  \n", encoding="utf-8")
    assert read_prompts_file(f) == ["a lighthouse at dusk", "a red bicycle"]
    with pytest.raises(InputError, match="missing.txt"):
        read_prompts_file(tmp_path / "missing.txt")


def test_generate_defaults_follow_the_model_family():
    turbo = task_options("generate", {}, "stabilityai/sd-turbo")
    assert isinstance(turbo, GenerateOptions)
    assert (turbo.steps, turbo.guidance, turbo.strength) == (1, 0.0, None)
    turbo_i2i = task_options("generate", {"init": True}, "stabilityai/sd-turbo")
    assert (turbo_i2i.steps, turbo_i2i.strength) == (2, 0.6)
    other = task_options("generate", {"init": True, "strength": 0.25}, "some/sd-model")
    assert (other.steps, other.guidance, other.strength) == (30, 7.5, 0.25)


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("caption", {"num_beams": 0}, "--num-beams"),
        ("caption", {"steps": 4}, "--steps"),
        ("classify", {"prefix": "a"}, "--prefix"),
        ("generate", {"width": 500, "height": 512}, "multiples of 8"),
        ("generate", {"width": 512}, "together"),
        ("generate", {"strength": 0.5}, "image-to-image"),
        ("generate", {"init": True, "steps": 1, "strength": 0.5}, "raise --steps"),
    ],
)
def test_bad_task_options_name_the_option(task, options, message):
    with pytest.raises(BadInput, match=message):
        task_options(task, options, "some/model")


def test_size_parses_width_then_height():
    assert parse_size("512x768") == (512, 768)
    with pytest.raises(BadInput, match="WIDTHxHEIGHT"):
        parse_size("512")


def test_a_submission_fingerprint_changes_with_the_files_and_not_the_batch_size(tmp_path):
    import os

    from pixelmill.producer.client import fingerprint
    from pixelmill.producer.inputs import JobPlan

    # The batch size is the batch's message size, never one of its task options, so neither
    # the fingerprint nor the reuse recipe (both made of the stored options) can see it.
    with pytest.raises(BadInput, match="--batch-size: Extra inputs are not permitted"):
        task_options("caption", {"batch_size": 8}, "m")
    f = tmp_path / "a.jpg"
    f.write_bytes(b"one")
    plan = JobPlan(inputs=[str(f)])
    first = fingerprint("caption", "m", {"num_beams": 1}, plan)
    assert first == fingerprint("caption", "m", {"num_beams": 1}, plan)
    assert first != fingerprint("caption", "m", {"num_beams": 2}, plan)
    assert first != fingerprint("caption", "other", {"num_beams": 1}, plan)
    f.write_bytes(b"two!")  # the file changed on disk: another submission
    os.utime(f, ns=(1, 1))
    assert first != fingerprint("caption", "m", {"num_beams": 1}, plan)
