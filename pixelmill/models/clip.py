"""CLIP-style dual encoders (CLIP, SigLIP, ...: any model ``transformers``' ``AutoModel`` loads
with ``get_image_features`` and ``get_text_features``): zero-shot classify against labels in
the user's words, and image embeddings (task ``embed``) for search and relabelling.

- Zero-shot: each label is put in every template; the texts are embedded once per runner and
  label set (an LRU of ``LABEL_SETS``), the templates' unit embeddings averaged and
  re-normalised per label (CLIP's prompt ensembling; one template: exactly the label's own
  embedding). Scores are what transformers' ``zero-shot-image-classification`` pipeline gives:
  ``exp(logit_scale) * cos`` (``+ logit_bias``), softmax over the labels, or for SigLIP an
  independent sigmoid per label.
- Embed: the image tower's projected, L2-normalised features, one float32 vector per image,
  returned under ``EMBEDDING`` (the worker stores it in the database, not in the result JSON).
- ``clip_vit_b32_random``: CLIP ViT-B/32 with random weights (224 px, 512-d), built in memory,
  for throughput where the real weights cannot be downloaded. Its outputs mean nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Generic, cast

import numpy as np
import torch
from PIL import Image

from pixelmill.catalog import DUAL_ENCODER_TYPES, SIGMOID_TYPES
from pixelmill.errors import ModelUnavailable
from pixelmill.models.base import LoadOptions, OptionsT, Runner
from pixelmill.models.classify import DEFAULT_TOP_K, top_labels
from pixelmill.models.device import autocast, resolve_precision
from pixelmill.models.loading import load_failure, pretrained_options, revision_of
from pixelmill.tasks.classify import ClassifyOptions, label_texts
from pixelmill.tasks.embed import EmbedOptions

EMBEDDING = "embedding"
RANDOM_CLIP_B32 = "clip_vit_b32_random"
KIND = "a CLIP-style dual encoder (image and text towers)"
# Label sets whose text embeddings a runner keeps (a nightly job uses one or two).
LABEL_SETS = 16
# Texts per text-tower forward pass (thousands of labels x templates).
TEXT_BATCH = 256


def quiet_loading() -> None:
    """No progress bars from transformers' loading on a person's terminal (search, relabel)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def not_dual_encoder(name: str, model_type: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"model {name!r} (model type {model_type or 'unknown'!r}) is not a CLIP-style dual "
        "encoder with image and text towers: zero-shot labels, embed and search need one, e.g. "
        "openai/clip-vit-base-patch32 or google/siglip-base-patch16-224 (a hub id or a folder)"
    )


def _features(out: Any) -> torch.Tensor:
    """``get_*_features``' projected features: a tensor (transformers 4) or the output's
    ``pooler_output`` (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    return cast(torch.Tensor, out[0])


class DualEncoderRunner(Runner[OptionsT], Generic[OptionsT]):
    """Loading, preprocessing and both towers, shared by the zero-shot classifier and the
    embedder."""

    def __init__(self, name: str, loading: LoadOptions | None = None) -> None:
        super().__init__(name, loading)
        self.model: Any = None
        self.image_processor: Any = None
        self.tokenizer: Any = None
        self.model_type = ""
        self.sigmoid = False
        self._min_side: int | None = None
        self._texts_lock = threading.Lock()

    # ---- loading ----
    def _load(self, device: str) -> None:
        from transformers import AutoConfig, AutoModel

        try:
            remote = pretrained_options(self.name, trust_remote_code=self.loading.trust_remote_code)
            config = AutoConfig.from_pretrained(self.name, **remote)
        except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
            raise load_failure(self.name, KIND, exc) from None
        model_type = str(getattr(config, "model_type", "") or "")
        if model_type not in DUAL_ENCODER_TYPES:
            raise not_dual_encoder(self.name, model_type)
        try:
            model = AutoModel.from_pretrained(self.name, **remote)
            image_processor, tokenizer = self._processors(remote)
        except Exception as exc:  # noqa: BLE001
            raise load_failure(self.name, KIND, exc) from None
        self._set(model, image_processor, tokenizer, revision_of(model.config, self.name), device)

    def _processors(self, remote: dict[str, Any]) -> tuple[Any, Any]:
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        processor = AutoProcessor.from_pretrained(self.name, **remote)  # type: ignore[no-untyped-call]
        image_processor = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is None:
            image_processor = AutoImageProcessor.from_pretrained(self.name, **remote)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.name, **remote)
        return image_processor, tokenizer

    def _set(
        self, model: Any, image_processor: Any, tokenizer: Any, revision: str | None, device: str
    ) -> None:
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise not_dual_encoder(self.name, str(getattr(model.config, "model_type", "")))
        self.model_type = str(model.config.model_type)
        self.sigmoid = self.model_type in SIGMOID_TYPES
        self.precision = resolve_precision(device, self.loading.precision)
        model = model.eval().to(device)
        if self.loading.compile:
            model.vision_model = torch.compile(model.vision_model)
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.revision = revision
        self._min_side = _shorter_side(image_processor)

    # ---- images ----
    @property
    def min_side(self) -> int | None:
        return self._min_side

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        out = self.image_processor(images=image, return_tensors="pt")
        return cast(torch.Tensor, out["pixel_values"][0])

    def collate(self, items: list[Any]) -> torch.Tensor:
        batch = torch.stack(items)
        assert self.device is not None
        if self.device.startswith("cuda"):
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def image_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Unit-length float32 image embeddings, one row per image."""
        with torch.inference_mode(), autocast(self.device or "cpu", self.precision):
            feats = _features(self.model.get_image_features(pixel_values=batch))
        feats = feats.float()
        return cast(torch.Tensor, feats / feats.norm(p=2, dim=-1, keepdim=True))

    # ---- texts ----
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unit-length float32 text embeddings, one row per text (tokenised as transformers'
        zero-shot pipeline does: SigLIP padded to 64 tokens)."""
        if self.model is None:
            raise RuntimeError(f"model {self.name} used before load()")
        kwargs: dict[str, Any] = {"padding": True, "truncation": True}
        if "siglip" in self.model_type:
            kwargs.update(padding="max_length", max_length=64)
        rows = []
        with torch.inference_mode(), autocast(self.device or "cpu", self.precision):
            for start in range(0, len(texts), TEXT_BATCH):
                tokens = self.tokenizer(
                    texts[start : start + TEXT_BATCH], return_tensors="pt", **kwargs
                ).to(self.device)
                rows.append(_features(self.model.get_text_features(**tokens)).float())
        feats = torch.cat(rows)
        return cast(torch.Tensor, feats / feats.norm(p=2, dim=-1, keepdim=True))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """``text_features`` as a float32 array (for callers that do not use torch)."""
        return self.text_features(texts).cpu().numpy().astype(np.float32)

    def embed_image(self, path: str) -> np.ndarray:
        """One image file's unit-length embedding, as a float32 array; BadInput for a file
        that cannot be read or decoded."""
        item = self.prepare(path, {}, cast(Any, None))
        return self.image_features(self.collate([item]))[0].cpu().numpy().astype(np.float32)

    def scale_bias(self) -> tuple[float, float]:
        """What the cosine is multiplied by, ``exp(logit_scale)`` (ALIGN has none: it divides
        by a ``temperature``), and ``logit_bias`` (0 where the model has none)."""
        logit_scale = getattr(self.model, "logit_scale", None)
        if logit_scale is not None:
            scale = float(logit_scale.detach().float().exp())
        else:
            scale = 1.0 / float(self.model.temperature.detach().float())
        bias = getattr(self.model, "logit_bias", None)
        return scale, float(bias.detach().float()) if bias is not None else 0.0


class ZeroShotClassifier(DualEncoderRunner[ClassifyOptions]):
    """classify with ``labels``: top-k over the user's labels."""

    task = "classify"

    def __init__(
        self, name: str, loading: LoadOptions | None = None, *, top_k: int = DEFAULT_TOP_K
    ) -> None:
        super().__init__(name, loading)
        self.top_k = top_k
        self._label_sets: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = (
            OrderedDict()
        )
        self.text_encodings = 0  # label sets embedded (each once per runner)

    def label_matrix(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        """One unit-length row per label: its templates' embeddings averaged, re-normalised;
        computed once per label set and kept."""
        key = (labels, templates)
        with self._texts_lock:
            cached = self._label_sets.get(key)
            if cached is not None:
                self._label_sets.move_to_end(key)
                return cached
            feats = self.text_features(label_texts(labels, templates))
            feats = feats.view(len(labels), len(templates), -1).mean(dim=1)
            matrix = feats / feats.norm(p=2, dim=-1, keepdim=True)
            self._label_sets[key] = matrix
            self.text_encodings += 1
            while len(self._label_sets) > LABEL_SETS:
                self._label_sets.popitem(last=False)
            return cast(torch.Tensor, matrix)

    def scores(self, image_feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image, a score per label: softmax over the labels, or SigLIP's sigmoids."""
        scale, bias = self.scale_bias()
        logits = image_feats @ labels.to(image_feats.device).T * scale + bias
        return logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)

    def forward(self, batch: Any, options: ClassifyOptions) -> list[dict[str, Any]]:
        if options.labels is None or options.templates is None:
            raise ModelUnavailable(
                f"model {self.name!r} is a CLIP-style dual encoder: it classifies against "
                "labels you give (--labels)"
            )
        matrix = self.label_matrix(options.labels, options.templates)
        return top_labels(self.scores(self.image_features(batch), matrix), options.labels,
                          self.top_k)  # fmt: skip

    def classify_vectors(
        self, vectors: np.ndarray, options: ClassifyOptions, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """Stored unit-length image embeddings (one row each) scored against the options'
        labels: the results ``forward`` gives for the images themselves."""
        if options.labels is None or options.templates is None:
            raise ValueError("classify_vectors needs options with labels")
        matrix = self.label_matrix(options.labels, options.templates)
        feats = torch.from_numpy(np.array(vectors, dtype=np.float32))  # a copy: writable
        return top_labels(self.scores(feats, matrix), options.labels, top_k or self.top_k)


class ImageEmbedder(DualEncoderRunner[EmbedOptions]):
    """embed: one unit-length float32 vector per image, under ``EMBEDDING``."""

    task = "embed"

    def forward(self, batch: Any, options: EmbedOptions) -> list[dict[str, Any]]:
        feats = self.image_features(batch).cpu().numpy().astype(np.float32)
        return [{"dim": int(row.shape[0]), EMBEDDING: row} for row in feats]


class _RandomCLIP:
    """CLIP ViT-B/32 (``CLIPConfig()``'s defaults: ViT-B/32 at 224 px, a 12-layer text tower,
    512-d projections) with seeded random weights, a small CLIP tokenizer and CLIP's image
    processor."""

    name: str
    loading: LoadOptions

    def _load(self, device: str) -> None:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        from pixelmill.models.random_weights import clip_tokenizer

        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig())
        tokenizer = clip_tokenizer(["a", "photo", "of", "cat", "dog", "car", "receipt"], 77)
        cast(Any, self)._set(model, CLIPImageProcessor(), tokenizer, "random", device)


class RandomCLIPClassifier(_RandomCLIP, ZeroShotClassifier):
    pass


class RandomCLIPEmbedder(_RandomCLIP, ImageEmbedder):
    pass


def _shorter_side(image_processor: Any) -> int | None:
    """The shorter side the processor resizes to (lets a large image decode reduced). ``size``
    is a dict in transformers 4 and a ``SizeDict`` (``.get``, not a ``dict``) in 5."""
    get = getattr(getattr(image_processor, "size", None), "get", None)
    if get is None:
        return None
    if get("shortest_edge"):
        return int(get("shortest_edge"))
    if get("height") and get("width"):
        return int(min(get("height"), get("width")))
    return None
