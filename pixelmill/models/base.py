"""The model runner contract.

- A runner is built with its name and the worker's ``LoadOptions`` (explicit keywords: a
  misspelt one is a TypeError), then ``load(device)`` once per worker process, after it
  started; idempotent.
- Task options arrive typed: the caller validates a batch's options dict once, with
  ``pixelmill.tasks.task_options(task, options, model)``, and hands every call the same
  ``TaskOptions`` object (``ClassifyOptions``, ``CaptionOptions`` or ``GenerateOptions``: the
  runner's ``OptionsT``). A runner never validates them again.
- ``prepare(input, params, options)`` per item (by default ``preprocess(decode(input))``),
  thread-safe, so the worker can run it in a pool while the previous batch is on the device.
- ``run(items, options)``: a batch in, exactly one result per item out, in order. ``options``
  are the batch's task options (the same for every item of one call). It is ``collate`` (stack
  the items and move them to the device: once per batch, not per item) then ``forward``.
- A result is a JSON-able dict; a runner that produces an image puts it under ``IMAGE`` and the
  worker stores it in the object store (never in the database;
  ``pixelmill.models.artifacts`` encodes it).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from PIL import Image

from pixelmill import tasks
from pixelmill.models.device import PRECISIONS
from pixelmill.models.images import Fetched, decode_image
from pixelmill.tasks import TaskOptions

IMAGE = "image"

OptionsT = TypeVar("OptionsT", bound=TaskOptions)


@dataclass(frozen=True)
class LoadOptions:
    """How a runner loads its model (the worker's settings, the same for every model).

    ``precision``: auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16.
    ``trust_remote_code``: run code shipped with a hub model; off unless the user asks.
    ``compile``: ``torch.compile`` the network (slow first batches, faster after)."""

    precision: str = "auto"
    trust_remote_code: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")


class Runner(ABC, Generic[OptionsT]):
    task: ClassVar[str]

    def __init__(self, name: str, loading: LoadOptions | None = None) -> None:
        self.name = name
        self.loading = loading or LoadOptions()
        self.revision: str | None = None
        self.device: str | None = None
        self.precision = "fp32"
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

    def decode(self, path: str | Fetched) -> Image.Image:
        return decode_image(path, min_side=self.min_side)

    @abstractmethod
    def preprocess(self, image: Image.Image) -> Any:
        """One decoded image to the model's input for one item (a CPU tensor)."""

    def prepare(self, input: str | Fetched, params: dict[str, Any], options: OptionsT) -> Any:
        """One job's input (a file's path, or an object already fetched) and parameters to
        one item of a batch; raises BadInput."""
        return self.preprocess(self.decode(input))

    def run(self, items: list[Any], options: OptionsT) -> list[dict[str, Any]]:
        """A batch of prepared items to one result per item, in order."""
        if not self.loaded:
            raise RuntimeError(f"model {self.name} used before load()")
        self.check_options(options)
        outputs = self.forward(self.collate(items), options)
        self.check_outputs(items, outputs)
        return outputs

    def check_options(self, options: object) -> None:
        """Options must come validated, as the task's options type (a dict is refused)."""
        known = tasks.registry().get(self.task)
        expected = known.options if known is not None else TaskOptions
        if not isinstance(options, expected):
            raise TypeError(
                f"model {self.name}: options must be {expected.__name__} (validated with "
                f"pixelmill.tasks.task_options), not {type(options).__name__}"
            )

    def collate(self, items: list[Any]) -> Any:
        """Prepared items to one batch on the device (by default: the list as it is)."""
        return items

    @abstractmethod
    def forward(self, batch: Any, options: OptionsT) -> list[dict[str, Any]]:
        """A collated batch to one result per item, in order."""

    def check_outputs(self, items: list[Any], outputs: list[dict[str, Any]]) -> None:
        if len(outputs) != len(items):
            raise RuntimeError(
                f"model {self.name} returned {len(outputs)} results for {len(items)} inputs"
            )
