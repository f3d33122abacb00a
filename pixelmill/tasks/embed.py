"""embed: one unit-length image embedding per image, from a CLIP-style dual encoder, stored in
the database for search by a sentence or an example image and for relabelling without the
GPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pixelmill.errors import InputError
from pixelmill.tasks.base import Column, Task, TaskOptions
from pixelmill.tasks.classify import (
    DEFAULT_ZERO_SHOT_MODEL,
    DUAL_ENCODER,
    is_dual_encoder,
    not_a_dual_encoder,
)


class EmbedOptions(TaskOptions):
    pass


class Embed(Task):
    name = "embed"
    options = EmbedOptions
    default_model = DEFAULT_ZERO_SHOT_MODEL
    default_batch_size = 32
    runners = {"embed": "pixelmill.models.clip:ImageEmbedder"}
    builtin_models = {"embed": {"clip_vit_b32_random": "pixelmill.models.clip:RandomCLIPEmbedder"}}
    model_kinds = {"embed": DUAL_ENCODER}
    embeds = True

    def check_model(self, model: str, options: Mapping[str, Any]) -> None:
        if is_dual_encoder(model) is False:
            raise InputError(not_a_dual_encoder(model, "embed"))

    def summarize(self, result: Mapping[str, Any]) -> str | None:
        # The vector itself is in the database (search, export).
        return f"embedded ({result['dim']}-d)" if set(result) == {"dim"} else None

    def export_columns(self, labels: int) -> list[Column]:
        return [Column("embedding", "vector")]
