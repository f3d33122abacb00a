"""The per-process model cache: each model is loaded once per worker process, on first use, and
kept while it is among the ``size`` most recently used. When the device runs out of memory the
other models are dropped first, so the one in use can go on."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from pixelmill import tasks
from pixelmill.errors import ModelUnavailable
from pixelmill.models.base import Runner
from pixelmill.models.classify import DEFAULT_TOP_K
from pixelmill.models.loading import load_failure
from pixelmill.models.registry import create_runner

log = logging.getLogger(__name__)


def model_kind(kind: str) -> str:
    """What a model is loaded as for runner ``kind``, in the reason a load failure gives."""
    for task in tasks.registry().values():
        if kind in task.model_kinds:
            return task.model_kinds[kind]
    return f"a {kind} model"


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# How long a model that failed to load is not tried again by a worker (its jobs fail at once
# with the same reason); `pixelmill retry BATCH` after that tries it afresh.
FAILED_LOAD_TTL = 300.0


class ModelCache:
    """Loaded runners by (task, model name); the least recently used is dropped past ``size``.
    The other options go to every runner it creates (``registry.create_runner``)."""

    def __init__(
        self,
        device: str,
        *,
        size: int = 2,
        top_k: int = DEFAULT_TOP_K,
        precision: str = "auto",
        trust_remote_code: bool = False,
        compile: bool = False,
    ) -> None:
        self.device = device
        self.size = size
        self.top_k = top_k
        self.precision = precision
        self.trust_remote_code = trust_remote_code
        self.compile = compile
        self._runners: OrderedDict[tuple[str, str], Runner[Any]] = OrderedDict()
        self._lock = threading.RLock()
        # Models that could not be loaded, with when to try again: the next messages naming
        # one fail at once instead of paying its load (minutes of hub retries offline) again.
        self._failed: dict[tuple[str, str], tuple[ModelUnavailable, float]] = {}
        self.loads = 0
        self.evictions = 0

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._runners

    def loaded(self) -> list[str]:
        """The names of the models loaded now, least recently used first (for the worker's
        report; read without the lock, which a load holds for minutes)."""
        return [name for _, name in list(self._runners)]

    def get(self, task: str, name: str) -> Runner[Any]:
        key = (task, name)
        with self._lock:
            runner = self._runners.get(key)
            if runner is not None:
                self._runners.move_to_end(key)
                return runner
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() < failed[1]:
                raise failed[0]
            started = time.perf_counter()
            try:
                runner = create_runner(
                    task,
                    name,
                    top_k=self.top_k,
                    precision=self.precision,
                    trust_remote_code=self.trust_remote_code,
                    compile=self.compile,
                )
                try:
                    runner.load(self.device)
                except Exception as exc:
                    # Out of memory while loading: drop every other model, then try once more.
                    if not self.relieve(exc):
                        raise
                    runner.load(self.device)
            except ModelUnavailable as exc:
                self._failed[key] = (exc, time.monotonic() + FAILED_LOAD_TTL)
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to load names the model
                failure = load_failure(name, model_kind(task), exc)
                log.warning("model cache: %s", failure, exc_info=exc)
                self._failed[key] = (failure, time.monotonic() + FAILED_LOAD_TTL)
                raise failure from exc
            self._failed.pop(key, None)
            self.loads += 1
            log.info(
                "model cache: loaded %s/%s on %s in %.1fs (%s)",
                task, name, self.device, time.perf_counter() - started, runner.precision,
            )  # fmt: skip
            self._runners[key] = runner
            while len(self._runners) > self.size:
                self._drop(next(iter(self._runners)), "least recently used")
            return runner

    def relieve(self, exc: BaseException, *, keep: Runner[Any] | None = None) -> bool:
        """After an out-of-memory error, free every loaded model but ``keep``; True if the
        error was one and memory was given back (so a retry may succeed)."""
        if not is_out_of_memory(exc):
            return False
        with self._lock:
            for key in [k for k, r in self._runners.items() if r is not keep]:
                self._drop(key, "out of memory")
        gc.collect()
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    def _drop(self, key: tuple[str, str], why: str) -> None:
        self._runners.pop(key)
        self.evictions += 1
        log.info("model cache: dropped %s/%s (%s)", key[0], key[1], why)
