"""The per-process model cache: each model is loaded once per worker process, on first use."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from models.base import Runner
from models.registry import create_runner


class ModelCache:
    """Loaded runners by (task, model name); the least recently used is dropped past ``size``."""

    def __init__(self, device: str, *, size: int = 2, **runner_options: Any) -> None:
        self.device = device
        self.size = size
        self.runner_options = runner_options
        self._runners: OrderedDict[tuple[str, str], Runner] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, task: str, name: str) -> Runner:
        key = (task, name)
        with self._lock:
            runner = self._runners.get(key)
            if runner is not None:
                self._runners.move_to_end(key)
                return runner
            runner = create_runner(task, name, **self.runner_options)
            runner.load(self.device)
            self.loads += 1
            self._runners[key] = runner
            while len(self._runners) > self.size:
                self._runners.popitem(last=False)
            return runner
