"""The task types, and the registry the rest of pixelmill asks about them.

Each task type is one module here (``classify``, ``caption``, ``embed``, ``generate``): its
options, defaults, command-line flags, reuse recipe, result rendering and export columns, and
the runners its models load as (``pixelmill.tasks.base.Task``). Another package adds one with
an entry point in the group ``pixelmill.tasks`` naming its ``Task`` subclass::

    [project.entry-points."pixelmill.tasks"]
    brightness = "my_package.tasks:Brightness"

Producers and workers both read the registry, so a task type must be installed wherever it is
submitted and run. Light on purpose: nothing here imports torch or SQL.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from pixelmill.errors import ConfigError, InputError
from pixelmill.tasks.base import PREPROCESS_VERSION, Column, Task, TaskOptions
from pixelmill.tasks.caption import Caption
from pixelmill.tasks.classify import Classify
from pixelmill.tasks.embed import Embed
from pixelmill.tasks.generate import Generate

__all__ = [
    "ENTRY_POINTS",
    "PREPROCESS_VERSION",
    "Column",
    "Task",
    "TaskOptions",
    "get",
    "names",
    "registry",
    "task_options",
]

ENTRY_POINTS = "pixelmill.tasks"
BUILTIN: tuple[type[Task], ...] = (Classify, Caption, Generate, Embed)


@functools.cache
def registry() -> Mapping[str, Task]:
    """Every task type by name: the built-in ones, then those installed packages add (read once
    per process). A broken or clashing one is a ConfigError naming it."""
    tasks = {cls.name: cls() for cls in BUILTIN}
    for point in entry_points(group=ENTRY_POINTS):
        where = f"task type {point.name!r} ({point.value}, entry point group {ENTRY_POINTS})"
        try:
            cls = point.load()
        except Exception as exc:  # noqa: BLE001 - whatever its import raises, say where
            raise ConfigError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"{where} is not a pixelmill.tasks.base.Task subclass")
        if getattr(cls, "name", None) != point.name:
            raise ConfigError(f"{where}: its class names itself {getattr(cls, 'name', None)!r}")
        if point.name in tasks:
            raise ConfigError(f"{where}: a task type of that name is already registered")
        tasks[point.name] = cls()
    return tasks


def names() -> tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> Task:
    """The task type ``name``; InputError naming the ones there are."""
    task = registry().get(name)
    if task is None:
        raise InputError(f"unknown task {name!r}; available: {', '.join(names())}")
    return task


def task_options(task: str, options: Mapping[str, Any] | None, model: str) -> TaskOptions:
    """A batch's options validated (and completed for ``model``); BadInput naming the bad
    option. What a worker hands its runner."""
    return get(task).validate(options, model)
