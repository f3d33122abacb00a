"""Decoding images the way a user expects: EXIF orientation applied, any mode to RGB correctly,
and every failure a ``BadInput`` that names the file. Pillow's decompression-bomb guard stays on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pixelmill.errors import BadInput

# Transparent pixels are composited onto this colour before the model sees them.
BACKGROUND = (255, 255, 255)

# A truncated file is an error, never a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(path: str | os.PathLike[str], *, min_side: int | None = None) -> Image.Image:
    """Open ``path`` and return an upright RGB image.

    ``min_side``: the model only needs this many pixels on the shorter side, so a large JPEG
    may be decoded at a reduced scale (Pillow ``draft``), which is several times faster.
    """
    name = os.fsdecode(path)
    p = Path(path)
    try:
        if p.is_dir():
            raise BadInput(f"{name}: is a directory, not an image file")
        size = p.stat().st_size
    except OSError as exc:
        raise BadInput(f"{name}: cannot read the file ({exc.strerror or exc})") from None
    if size == 0:
        raise BadInput(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(p) as im:
            w, h = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and w * h > limit:
                raise BadInput(
                    f"{name}: image too large ({w}x{h} = {w * h} pixels, limit {limit}); "
                    "refused as a possible decompression bomb"
                )
            if min_side and im.format == "JPEG" and min(w, h) >= 2 * min_side:
                scale = min(w, h) / min_side
                im.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
            im.load()
            upright = ImageOps.exif_transpose(im)
            return to_rgb(upright if upright is not None else im)
    except BadInput:
        raise
    except Image.DecompressionBombError as exc:
        raise BadInput(f"{name}: refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise BadInput(f"{name}: not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(f"{name}: corrupt or truncated image ({exc})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited onto BACKGROUND, 16-bit scaled."""
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im)
        hi = float(arr.max(initial=1.0)) or 1.0
        arr8 = np.clip(np.rint(arr / (hi if hi > 1.0 else 1.0) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in im.info)
        or (mode in ("L", "RGB") and "transparency" in im.info)
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
