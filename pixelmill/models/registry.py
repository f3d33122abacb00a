"""Resolve a model name to a runner: a built-in name, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pixelmill.catalog import TASKS, TaskOptions
from pixelmill.errors import ModelUnavailable
from pixelmill.models.base import LoadOptions, Runner
from pixelmill.models.caption import Captioner
from pixelmill.models.classify import (
    BUILTIN_EFFICIENTNET,
    DEFAULT_TOP_K,
    RANDOM_VIT_B16,
    Classifier,
    EfficientNetLite0,
    HFClassifier,
    RandomViTB16,
)
from pixelmill.models.clip import (
    RANDOM_CLIP_B32,
    ImageEmbedder,
    RandomCLIPClassifier,
    RandomCLIPEmbedder,
    ZeroShotClassifier,
    not_dual_encoder,
)
from pixelmill.models.generate import ImageGenerator
from pixelmill.models.null import NULL_MODEL, NullRunner
from pixelmill.models.random_weights import (
    RANDOM_BLIP_BASE,
    RANDOM_SD_TURBO,
    RandomBlipBase,
    RandomSDTurbo,
)

# The runner kind of a classify batch with labels (zero-shot): a model cache key of its own,
# since one model name loads as another kind of runner (a CLIP-style dual encoder).
ZERO_SHOT = "classify:labels"
BUILTIN: dict[tuple[str, str], type[Runner[Any]]] = {
    ("classify", BUILTIN_EFFICIENTNET): EfficientNetLite0,
    ("classify", RANDOM_VIT_B16): RandomViTB16,
    (ZERO_SHOT, RANDOM_CLIP_B32): RandomCLIPClassifier,
    ("embed", RANDOM_CLIP_B32): RandomCLIPEmbedder,
    ("caption", RANDOM_BLIP_BASE): RandomBlipBase,
    ("generate", RANDOM_SD_TURBO): RandomSDTurbo,
}
# What a hub id or a local folder is loaded as, per runner kind.
PRETRAINED: dict[str, type[Runner[Any]]] = {
    "classify": HFClassifier,
    ZERO_SHOT: ZeroShotClassifier,
    "caption": Captioner,
    "generate": ImageGenerator,
    "embed": ImageEmbedder,
}
BUILTIN_NAMES = frozenset(name for _, name in BUILTIN)


def runner_kind(task: str, options: TaskOptions) -> str:
    """What a batch's jobs are run by: the task, or ``ZERO_SHOT`` for classify with labels."""
    if task == "classify" and getattr(options, "labels", None) is not None:
        return ZERO_SHOT
    return task


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_task(task: str) -> str:
    if task not in TASKS and task != ZERO_SHOT:
        raise ModelUnavailable(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    return task


def local_folder(name: str) -> Path | None:
    """The existing path ``name`` names (``~`` expanded, resolved), or None. A name the system
    refuses to look up raises ModelUnavailable with the real cause: an unknown ``~user``, a
    name too long, a folder the worker may not search."""
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        user = name.split("/", 1)[0]
        raise ModelUnavailable(
            f"cannot load model {name!r}: {user!r} is not a user on this worker's host, so the "
            "path cannot be expanded; pass the folder's absolute path with --model"
        ) from None
    try:
        return path.resolve() if path.exists() else None
    except (OSError, ValueError) as exc:  # ENAMETOOLONG, EACCES, ELOOP, an embedded NUL...
        why = getattr(exc, "strerror", None) or str(exc)
        raise ModelUnavailable(
            f"cannot load model {name!r}: the worker cannot look this path up ({why}); "
            "pass an existing model folder the worker may read, or a hub id (owner/name)"
        ) from None


def create_runner(
    task: str,
    name: str,
    *,
    top_k: int = DEFAULT_TOP_K,
    precision: str = "auto",
    trust_remote_code: bool = False,
    compile: bool = False,
) -> Runner[Any]:
    """A runner for ``name`` (not loaded yet); raises ModelUnavailable for an unusable name.
    ``top_k`` applies to classifiers; the others are ``LoadOptions`` for every runner. An
    unknown option is a TypeError."""
    check_task(task)
    loading = LoadOptions(precision=precision, trust_remote_code=trust_remote_code, compile=compile)
    if name == NULL_MODEL:
        return NullRunner(loading=loading, task=task)
    cls, path = _resolve(task, name)
    if issubclass(cls, (Classifier, ZeroShotClassifier)):
        return cls(path, loading, top_k=top_k)
    return cls(path, loading)


def _resolve(task: str, name: str) -> tuple[type[Runner[Any]], str]:
    """The runner class for ``name`` and the name or path it loads from."""
    builtin = BUILTIN.get((task, name))
    if builtin is not None:
        return builtin, name
    if task in (ZERO_SHOT, "embed") and name in BUILTIN_NAMES:
        raise not_dual_encoder(name, "built-in")
    pretrained = PRETRAINED[task]
    folder = local_folder(name)
    if folder is not None:
        return pretrained, str(folder)
    if HUB_ID.match(name):
        return pretrained, name
    raise ModelUnavailable(
        f"model {name!r} is neither a built-in model "
        f"({', '.join(n for _, n in BUILTIN)}, {NULL_MODEL}), "
        "an existing local folder, nor a Hugging Face hub id (owner/name)"
    )
