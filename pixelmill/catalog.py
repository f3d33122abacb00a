"""What producers and workers agree on besides the task types (``pixelmill.tasks``): which
files a folder scan picks up, which model families are CLIP-style dual encoders, how a job
names its file, an image size as typed. Light (no torch)."""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from pixelmill.errors import BadInput

DEFAULT_MESSAGE_SIZE = 32  # batches made before their options recorded a batch size


def message_size(size: int | None) -> int:
    """Jobs per message for a batch: the batch size it was submitted with (its
    ``message_size``; unset in a batch registered by a producer without one)."""
    return size or DEFAULT_MESSAGE_SIZE


# What a folder scan picks up. A file named explicitly is submitted whatever its extension.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm",
     ".pgm", ".avif", ".heic", ".heif"}
)  # fmt: skip


# Model families that are CLIP-style dual encoders (an image tower and a text tower trained to
# agree, with ``get_image_features`` / ``get_text_features``): what zero-shot labels, embed and
# search run on. ``transformers`` config ``model_type`` values.
DUAL_ENCODER_TYPES = frozenset(
    {"clip", "siglip", "siglip2", "chinese_clip", "altclip", "align", "metaclip_2"}
)
# Those whose scores are independent sigmoids (as transformers' pipeline): the others softmax.
SIGMOID_TYPES = frozenset({"siglip", "siglip2"})


# The most hits one search returns.
MAX_SEARCH_LIMIT = 1000


SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """ "512x768" -> (512, 768): width, then height."""
    match = SIZE.match(text)
    if not match:
        raise BadInput(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    return int(match.group(1)), int(match.group(2))


PATH_BYTES = "path_b64"  # a job param: the exact file name bytes, when they are not UTF-8
# A job param: the object store key of the input's uploaded copy (`--upload`), which the
# worker fetches instead of opening the input's path.
STORED_INPUT = "stored"


def job_path(input: str, params: dict[str, Any]) -> str:
    """The file a job names: its input, or the exact bytes kept in its params."""
    raw = params.get(PATH_BYTES)
    return os.fsdecode(base64.b64decode(raw)) if isinstance(raw, str) else input
