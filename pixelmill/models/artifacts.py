"""What a runner's output image becomes in the object store: PNG bytes that carry their
provenance (the model, its revision, the device and precision, and the result's own scalar
fields such as prompt, seed and steps) in a ``pixelmill`` text chunk (docs/cli.md)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from PIL import Image, PngImagePlugin

from pixelmill.models.base import Runner

PROVENANCE_KEY = "pixelmill"  # the PNG text chunk that holds the provenance, as JSON


def provenance(runner: Runner[Any], device: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """What made an image: the runner that made it, on ``device`` (the worker's label), and the
    plain values of its result (strings and numbers; the image itself and lists are left out)."""
    return {
        "model": runner.name,
        "model_revision": runner.revision,
        "device": device,
        "precision": runner.precision,
        **{k: v for k, v in result.items() if isinstance(v, str | int | float)},
    }


def encode_png(image: Image.Image, provenance: Mapping[str, Any]) -> bytes:
    """``image`` as PNG bytes, with ``provenance`` as JSON (keys sorted) in its text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
