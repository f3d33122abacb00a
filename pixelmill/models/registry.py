"""Resolve a model name to a runner: a built-in name, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

from pixelmill import tasks
from pixelmill.errors import ModelUnavailable
from pixelmill.models.base import LoadOptions, Runner
from pixelmill.models.classify import DEFAULT_TOP_K
from pixelmill.models.null import NULL_MODEL, NullRunner
from pixelmill.tasks import TaskOptions
from pixelmill.tasks.classify import ZERO_SHOT

# Every runner is named by its task type (``pixelmill.tasks``) as "module:Class" and imported
# when first asked for, so a worker imports the model code of the tasks it runs only.


def _load(path: str) -> type[Runner[Any]]:
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise ModelUnavailable(f"{path} is not a pixelmill.models.base.Runner subclass")
    return cls


def builtin_models() -> dict[tuple[str, str], str]:
    """(runner kind, built-in model name) -> "module:Class", over every task type."""
    return {
        (kind, name): path
        for task in tasks.registry().values()
        for kind, models in task.builtin_models.items()
        for name, path in models.items()
    }


# Every built-in model name (of the task types known when this module was imported).
BUILTIN_NAMES = frozenset(name for _, name in builtin_models())


def pretrained(kind: str) -> str:
    """What a hub id or a local folder loads as for runner ``kind``."""
    for task in tasks.registry().values():
        if kind in task.runners:
            return task.runners[kind]
    raise ModelUnavailable(f"no task type runs models of kind {kind!r}")


def runner_kind(task: str, options: TaskOptions) -> str:
    """What a batch's jobs are run by: the task, or a kind of its own (``ZERO_SHOT`` for
    classify with labels)."""
    return tasks.get(task).runner_kind(options)


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_task(kind: str) -> str:
    if not any(kind in task.runners for task in tasks.registry().values()):
        available = ", ".join(tasks.names())
        raise ModelUnavailable(f"unknown task {kind!r}; available: {available}")
    return kind


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
    if "top_k" in inspect.signature(cls).parameters:  # the classifiers
        return cls(path, loading, top_k=top_k)  # type: ignore[call-arg]
    return cls(path, loading)


def _resolve(task: str, name: str) -> tuple[type[Runner[Any]], str]:
    """The runner class for ``name`` and the name or path it loads from."""
    builtins = builtin_models()
    builtin = builtins.get((task, name))
    if builtin is not None:
        return _load(builtin), name
    if task in (ZERO_SHOT, "embed") and name in {n for _, n in builtins}:
        from pixelmill.models.clip import not_dual_encoder

        raise not_dual_encoder(name, "built-in")
    folder = local_folder(name)
    if folder is not None:
        return _load(pretrained(task)), str(folder)
    if HUB_ID.match(name):
        return _load(pretrained(task)), name
    raise ModelUnavailable(
        f"model {name!r} is neither a built-in model "
        f"({', '.join(n for _, n in builtins)}, {NULL_MODEL}), "
        "an existing local folder, nor a Hugging Face hub id (owner/name)"
    )
