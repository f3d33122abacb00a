"""pixelmill: an asynchronous job queue for batch image processing.

    from pixelmill import Client, load_settings, local_cluster

One import name, one package: all of pixelmill's code is under this folder, in layers that
import only downwards (docs/layout.md): the command line (``pixelmill.cli``); the engines that
are not commands (``pixelmill.dashboard``, ``pixelmill.bench``); the producer and the worker
(``pixelmill.producer``, ``pixelmill.worker``); the database and the models
(``pixelmill.db``, ``pixelmill.models``); and the core modules beside this file (settings,
errors, the task types (``pixelmill.tasks``), the wire contract, revisions, deadlines,
stopping, logs).

The names below are imported when first used, so ``import pixelmill.settings`` stays light (no
SQL, no Celery worker, no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pixelmill.db.records import JobResult
    from pixelmill.errors import PixelmillError
    from pixelmill.producer.client import Client, Submission
    from pixelmill.settings import Settings, load_settings
    from pixelmill.worker.local import local_cluster

__version__ = "0.1.0"

_PUBLIC = {
    "Client": "pixelmill.producer.client",
    "JobResult": "pixelmill.db.records",
    "Submission": "pixelmill.producer.client",
    "Settings": "pixelmill.settings",
    "load_settings": "pixelmill.settings",
    "PixelmillError": "pixelmill.errors",
    "local_cluster": "pixelmill.worker.local",
}

__all__ = [
    "Client",
    "JobResult",
    "PixelmillError",
    "Settings",
    "Submission",
    "__version__",
    "load_settings",
    "local_cluster",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'pixelmill' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The public names, not this module's own helpers."""
    return sorted(__all__)
