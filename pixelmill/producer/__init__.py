"""The client side: submit work, wait for it, read status and results.

    from pixelmill.producer import Client

    with Client() as pm:
        batch = pm.submit("classify", ["photos/"])
        pm.wait(batch.batch_id)
        for job in pm.results(batch.batch_id):
            print(job.input, job.status, job.result)

Knows nothing of torch or models. The names below are imported when first used, so that a
command importing one module of the producer (``pixelmill.producer.output``) loads no SQL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pixelmill.db.records import JobResult
    from pixelmill.producer.client import Client, Submission
    from pixelmill.producer.inputs import expand_inputs

_PUBLIC = {
    "Client": "pixelmill.producer.client",
    "JobResult": "pixelmill.db.records",
    "Submission": "pixelmill.producer.client",
    "expand_inputs": "pixelmill.producer.inputs",
}

__all__ = ["Client", "JobResult", "Submission", "expand_inputs"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'pixelmill.producer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
