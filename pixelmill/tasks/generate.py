"""generate: images from prompts (text-to-image), or from prompts and input images
(image-to-image), through diffusers' auto pipelines (SD-Turbo by default). Never reused: each
image draws from its own seed, recorded with it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from pydantic import Field, model_validator

from pixelmill.catalog import parse_size
from pixelmill.errors import BadInput, InputError
from pixelmill.tasks.base import Column, Task, TaskOptions, set_values


class GenerateOptions(TaskOptions):
    """Text-to-image, or image+text-to-image when ``init`` is set (each input is the init
    image). Unset steps/guidance/strength take the model family's defaults (``resolved``)."""

    init: bool = False
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance: float | None = Field(default=None, ge=0, le=50)
    strength: float | None = Field(default=None, gt=0, le=1)
    width: int | None = Field(default=None, ge=8, le=4096)
    height: int | None = Field(default=None, ge=8, le=4096)
    negative_prompt: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _check(self) -> GenerateOptions:
        if (self.width is None) != (self.height is None):
            raise ValueError("give width and height together")
        for side in (self.width, self.height):
            if side is not None and side % 8:
                raise ValueError(f"image sides must be multiples of 8, got {side}")
        if self.strength is not None and not self.init:
            raise ValueError("strength applies to image-to-image only (give init images)")
        return self

    def resolved(self, model: str) -> GenerateOptions:
        """Fill the unset defaults for ``model``: distilled "turbo" models take 1 step without
        guidance (2 steps for image-to-image), others 30 steps at guidance 7.5."""
        turbo = "turbo" in model.lower()
        strength = self.strength if self.strength is not None else (0.6 if self.init else None)
        steps = self.steps
        if steps is None:
            steps = (2 if self.init else 1) if turbo else 30
            if strength is not None:
                steps = max(steps, math.ceil(1 / strength))
        guidance = self.guidance if self.guidance is not None else (0.0 if turbo else 7.5)
        out = self.model_copy(update={"steps": steps, "guidance": guidance, "strength": strength})
        if strength is not None and int(steps * strength) < 1:
            raise BadInput(
                f"image-to-image runs int(steps x strength) denoising steps: {steps} x "
                f"{strength} is 0; raise --steps or --strength"
            )
        return out


def read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read prompts ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# generate's flags that are not options as they are: they make the jobs (or the image size).
JOB_FLAGS = ("prompts", "prompts_file", "init", "count", "seed", "size")


class Generate(Task):
    name = "generate"
    options = GenerateOptions
    default_model = "stabilityai/sd-turbo"
    default_batch_size = 4
    runners = {"generate": "pixelmill.models.generate:ImageGenerator"}
    builtin_models = {
        "generate": {"sd_turbo_random": "pixelmill.models.random_weights:RandomSDTurbo"}
    }
    model_kinds = {"generate": "a diffusers text-to-image pipeline"}
    reusable = False
    takes_prompts = True
    flags = (
        click.option("--prompt", "prompts", multiple=True, help="generate: a prompt; repeat for "
                     "more."),
        click.option("--prompts-file", type=click.Path(dir_okay=False), default=None,
                     help="generate: a file with one prompt per line."),
        click.option("--init", "init", multiple=True, metavar="INPUT", help="generate: init "
                     "image(s) for image-to-image (file, folder or -); each prompt runs on each."),
        click.option("--count", type=int, default=1, show_default=True, help="generate: images "
                     "per prompt (per init image)."),
        click.option("--seed", type=int, default=None, help="generate: seed of the first image; "
                     "the next ones take seed+1, seed+2, ... (default: random, recorded)."),
        click.option("--steps", type=int, default=None, help="generate: denoising steps (default: "
                     "1 for turbo models, 2 with --init; else 30)."),
        click.option("--size", default=None, metavar="WxH", help="generate: output size, e.g. "
                     "512x512 (default: the model's own)."),
        click.option("--guidance", type=float, default=None, help="generate: guidance scale "
                     "(default 0 for turbo models, else 7.5)."),
        click.option("--strength", type=float, default=None, help="generate --init: how far from "
                     "the init image, 0..1 (default 0.6)."),
        click.option("--negative-prompt", default=None, help="generate: what to steer away from."),
    )  # fmt: skip

    def validate(
        self, options: Mapping[str, Any] | None, model: str, *, has_inputs: bool | None = None
    ) -> TaskOptions:
        given = dict(options or {})
        if has_inputs is not None:
            given["init"] = has_inputs
        opts = super().validate(given, model)
        assert isinstance(opts, GenerateOptions)
        return opts.resolved(model)

    def take_flags(self, given: dict[str, Any]) -> dict[str, Any]:
        return set_values(given, JOB_FLAGS, {"count": 1})

    def refuse_flags(self, taken: Mapping[str, Any], task: str) -> None:
        if "init" in taken:
            raise InputError(f"--init is for generate, not {task}")
        if "size" in taken:
            raise InputError(f"--size is for generate, not {task}")
        if taken:
            raise InputError(f"--prompt, --count and --seed are for generate, not {task}")

    def submission(
        self, inputs: Sequence[str], options: dict[str, Any], taken: Mapping[str, Any]
    ) -> dict[str, Any]:
        if inputs:
            raise InputError(
                "generate takes prompts, not INPUT: pass --prompt TEXT, and --init INPUT for "
                "image-to-image"
            )
        prompts = list(taken.get("prompts", ()))
        if taken.get("prompts_file"):
            prompts += read_prompts_file(taken["prompts_file"])
        if taken.get("size"):
            options["width"], options["height"] = parse_size(taken["size"])
        return {
            "inputs": list(taken.get("init", ())),
            "options": options,
            "prompts": prompts or None,
            "count": taken.get("count", 1),
            "seed": taken.get("seed"),
        }

    def export_columns(self, labels: int) -> list[Column]:
        return [Column("artifact"), Column("artifact_sha256")]
