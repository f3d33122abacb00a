"""The model runner contract.

- ``load(device)`` once per worker process, after it started; idempotent.
- ``decode(path)`` and ``preprocess(image)`` per item, thread-safe, so the worker can run them
  in a pool while the previous batch is on the device.
- ``run(items)``: a batch in, exactly one result per item out, in order.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from PIL import Image

from models.images import decode_image


class Runner(ABC):
    task: ClassVar[str]

    def __init__(self, name: str) -> None:
        self.name = name
        self.revision: str | None = None
        self.device: str | None = None
        self._load_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.device is not None

    def load(self, device: str) -> None:
        """Load weights onto ``device`` ("cpu" or "cuda:N"). A second call does nothing."""
        with self._load_lock:
            if self.device is not None:
                return
            self._load(device)
            self.device = device

    @abstractmethod
    def _load(self, device: str) -> None: ...

    @property
    def min_side(self) -> int | None:
        """Shorter side the model needs; lets large JPEGs decode at a reduced scale."""
        return None

    def decode(self, path: str) -> Image.Image:
        return decode_image(path, min_side=self.min_side)

    @abstractmethod
    def preprocess(self, image: Image.Image) -> Any:
        """One decoded image to the model's input for one item (a CPU tensor)."""

    @abstractmethod
    def run(self, items: list[Any]) -> list[dict[str, Any]]:
        """A batch of preprocessed items to one JSON-able result per item, in order."""

    def check_outputs(self, items: list[Any], outputs: list[dict[str, Any]]) -> None:
        if len(outputs) != len(items):
            raise RuntimeError(
                f"model {self.name} returned {len(outputs)} results for {len(items)} inputs"
            )
