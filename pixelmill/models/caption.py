"""Image captioning: any transformers image-to-text model that the auto classes load (BLIP,
VisionEncoderDecoder such as ViT-GPT2, GIT), from a hub id or a local folder.

Batched: one ``generate`` call per batch, greedy or beam search, with an optional text prefix
(conditional captioning) shared by the batch.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from PIL import Image

from pixelmill.models.base import LoadOptions, Runner
from pixelmill.models.device import resolve_precision, torch_dtype
from pixelmill.models.loading import load_failure, pretrained_options, revision_of
from pixelmill.tasks.caption import CaptionOptions


class Captioner(Runner[CaptionOptions]):
    task = "caption"

    def __init__(self, name: str, loading: LoadOptions | None = None) -> None:
        super().__init__(name, loading)
        self.model: Any = None
        self.image_processor: Any = None
        self.tokenizer: Any = None
        self.dtype = torch.float32

    def _load(self, device: str) -> None:
        model = self._build()
        self.precision = resolve_precision(device, self.loading.precision)
        self.dtype = torch_dtype(self.precision)
        self.model = model.eval().to(device=device, dtype=self.dtype)
        self.revision = self.revision or revision_of(model.config, self.name)

    def _build(self) -> Any:
        """The model (returned) and its image processor and tokenizer (set), from the hub or
        a folder."""
        from transformers import (
            AutoImageProcessor,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        try:
            remote = pretrained_options(self.name, trust_remote_code=self.loading.trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(self.name, **remote)
            processor = AutoProcessor.from_pretrained(self.name, **remote)  # type: ignore[no-untyped-call]
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                self.image_processor = processor.image_processor
                self.tokenizer = processor.tokenizer
            else:  # VisionEncoderDecoder folders carry the two parts without a processor class
                self.image_processor = AutoImageProcessor.from_pretrained(self.name, **remote)
                self.tokenizer = AutoTokenizer.from_pretrained(self.name, **remote)
        except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
            raise load_failure(self.name, "an image-to-text (caption) model", exc) from None
        return model

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return cast(torch.Tensor, pixels)

    def collate(self, items: list[Any]) -> torch.Tensor:
        return torch.stack(items).to(self.device, dtype=self.dtype, non_blocking=True)

    def forward(self, batch: Any, options: CaptionOptions) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "pixel_values": batch,
            "max_new_tokens": options.max_new_tokens,
            "num_beams": options.num_beams,
            "do_sample": False,
        }
        if options.prefix:
            kwargs.update(self._prefix(options.prefix, len(batch)))
        with torch.inference_mode():
            tokens = self.model.generate(**kwargs)
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [{"caption": " ".join(text.split())} for text in texts]

    def _prefix(self, prompt: str, n: int) -> dict[str, torch.Tensor]:
        """The text the caption must start with, as the model family expects it."""
        if self.model.config.is_encoder_decoder:
            start = self.model.config.decoder_start_token_id
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            row = torch.tensor([[start, *ids]], device=self.device)
            return {"decoder_input_ids": row.expand(n, -1)}
        encoded = self.tokenizer([prompt] * n, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids",)} | {
            "attention_mask": encoded["attention_mask"].to(self.device)
        }
