"""caption: a caption per image, from any transformers image-to-text model (BLIP by default;
VisionEncoderDecoder models such as ViT-GPT2; GIT)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click
from pydantic import Field

from pixelmill.tasks.base import Column, Task, TaskOptions


class CaptionOptions(TaskOptions):
    max_new_tokens: int = Field(default=30, ge=1, le=512)
    num_beams: int = Field(default=1, ge=1, le=16)
    prefix: str | None = Field(
        default=None, max_length=500, description="Text the caption starts with."
    )


class Caption(Task):
    name = "caption"
    options = CaptionOptions
    # A hub model: pre-download it for an offline host (docs/settings.md, "Models").
    default_model = "Salesforce/blip-image-captioning-base"
    default_batch_size = 16
    runners = {"caption": "pixelmill.models.caption:Captioner"}
    builtin_models = {
        "caption": {"blip_base_random": "pixelmill.models.random_weights:RandomBlipBase"}
    }
    model_kinds = {"caption": "an image-to-text (caption) model"}
    flags = (
        click.option("--max-new-tokens", type=int, default=None, help="caption: longest caption "
                     "in tokens (default 30)."),
        click.option("--num-beams", type=int, default=None, help="caption: beam search width "
                     "(default 1, greedy)."),
        click.option("--prefix", default=None, help="caption: text every caption starts with "
                     "(conditional captioning)."),
    )  # fmt: skip

    def summarize(self, result: Mapping[str, Any]) -> str | None:
        return str(result["caption"]) if "caption" in result else None

    def export_columns(self, labels: int) -> list[Column]:
        return [Column("caption")]

    def export_values(self, result: Mapping[str, Any]) -> dict[str, Any]:
        return {"caption": result.get("caption")}
