"""The null model: reads each input and returns an empty result. With it, an end-to-end run
measures what pixelmill itself costs per item (queue, database, file I/O), not the model."""

from __future__ import annotations

from typing import Any

from PIL import Image

from pixelmill import tasks
from pixelmill.errors import BadInput
from pixelmill.models.base import LoadOptions, Runner
from pixelmill.models.images import Fetched, open_input
from pixelmill.tasks import TaskOptions

NULL_MODEL = "null"
READ_CHUNK = 1 << 20


class NullRunner(Runner[TaskOptions]):
    task = "any"

    def __init__(
        self, name: str = NULL_MODEL, loading: LoadOptions | None = None, *, task: str = "classify"
    ) -> None:
        super().__init__(name, loading)
        self.for_task = task

    def _load(self, device: str) -> None:
        self.revision = "none"

    def preprocess(self, image: Image.Image) -> Any:
        return None

    def prepare(self, input: str | Fetched, params: dict[str, Any], options: TaskOptions) -> Any:
        task = tasks.registry().get(self.for_task)
        if task is not None and task.takes_prompts:  # a prompt, or an init image: not read
            return None
        if isinstance(input, Fetched):
            return len(input.data)
        # A FIFO or a device is refused before it is opened (opening a FIFO blocks; reading
        # /dev/urandom never ends); a regular file is read through, a MiB at a time.
        fp, _ = open_input(input)
        read = 0
        try:
            with fp:
                while chunk := fp.read(READ_CHUNK):
                    read += len(chunk)
        except OSError as exc:
            raise BadInput(f"{input}: cannot read the file ({exc.strerror or exc})") from None
        return read

    def forward(self, batch: Any, options: TaskOptions) -> list[dict[str, Any]]:
        return [{} for _ in batch]
