"""Image generation through diffusers' auto pipelines: text-to-image, and image+text-to-image
(img2img) over init images, from a hub id or a local folder.

One pipeline call per image, with its own seeded generator, so that an image depends on its
own model, prompt, seed and settings, and on nothing it was batched with. Batching prompts into
one call made it depend on its neighbours too: on the CPU the same seed gave other pixels alone
than beside a second prompt (a forward pass over 2 images takes other kernel paths than one over
1), so re-generating one image of a batch from its recorded seed did not give it back. Generators
live on the CPU: the same seed gives the same starting noise on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageOps

from pixelmill.errors import BadInput, ModelUnavailable
from pixelmill.models.base import IMAGE, LoadOptions, Runner
from pixelmill.models.device import resolve_precision, torch_dtype
from pixelmill.models.images import Fetched
from pixelmill.models.loading import load_failure, pretrained_options, revision_of
from pixelmill.tasks.generate import GenerateOptions


@dataclass(frozen=True)
class GenerateItem:
    prompt: str
    seed: int
    init: Image.Image | None = None


class ImageGenerator(Runner[GenerateOptions]):
    task = "generate"

    def __init__(self, name: str, loading: LoadOptions | None = None) -> None:
        super().__init__(name, loading)
        self.text2image: Any = None
        self._image2image: Any = None
        self._no_image2image: ModelUnavailable | None = None
        self.default_size = (512, 512)

    def _load(self, device: str) -> None:
        self.precision = resolve_precision(device, self.loading.precision)
        pipe = self._build(torch_dtype(self.precision))
        pipe.set_progress_bar_config(disable=True)
        self.text2image = pipe.to(device)
        if self.loading.compile:  # the denoiser is where the time goes
            for part in ("unet", "transformer"):
                if getattr(pipe, part, None) is not None:
                    setattr(pipe, part, torch.compile(getattr(pipe, part)))
        side = getattr(pipe, "default_sample_size", None) or _unet_sample_size(pipe)
        scale = getattr(pipe, "vae_scale_factor", 8)
        if side:
            self.default_size = (int(side * scale), int(side * scale))
        try:
            from diffusers import AutoPipelineForImage2Image

            self._image2image = AutoPipelineForImage2Image.from_pipe(pipe)
            self._image2image.set_progress_bar_config(disable=True)
        except Exception as exc:  # noqa: BLE001 - no img2img counterpart: text-to-image only
            kind = "a diffusers image-to-image pipeline"
            self._no_image2image = load_failure(self.name, kind, exc)
        component = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        self.revision = self.revision or revision_of(getattr(component, "config", None), self.name)

    def _build(self, dtype: torch.dtype) -> Any:
        """The text-to-image pipeline, from the hub or a folder."""
        from diffusers import AutoPipelineForText2Image

        try:
            remote = pretrained_options(self.name, trust_remote_code=self.loading.trust_remote_code)
            return AutoPipelineForText2Image.from_pretrained(self.name, dtype=dtype, **remote)  # type: ignore[no-untyped-call]
        except Exception as exc:  # noqa: BLE001 - diffusers raises OSError, ValueError, ...
            raise load_failure(self.name, "a diffusers text-to-image pipeline", exc) from None

    @property
    def image2image(self) -> Any:
        """The img2img pipeline, sharing the text-to-image pipeline's weights (no reload)."""
        if self._image2image is None:
            raise self._no_image2image or RuntimeError(f"model {self.name} used before load()")
        return self._image2image

    def size(self, opts: GenerateOptions) -> tuple[int, int]:
        if opts.width is not None and opts.height is not None:
            return opts.width, opts.height
        return self.default_size

    def preprocess(self, image: Image.Image) -> Image.Image:
        return image

    def prepare(
        self, input: str | Fetched, params: dict[str, Any], options: GenerateOptions
    ) -> Any:
        prompt = params.get("prompt")
        seed = params.get("seed")
        if not isinstance(prompt, str) or not isinstance(seed, int):
            raise BadInput(f"{input}: generate job without a prompt and a seed")
        init = None
        if options.init:
            self.image2image  # noqa: B018 - fails the job now if the model has no img2img
            # Centre-crop to the output's aspect ratio, then scale to the output size.
            init = ImageOps.fit(
                self.decode(input),
                self.size(options),
                Image.Resampling.LANCZOS,
                centering=(0.5, 0.5),
            )
        return GenerateItem(prompt=prompt, seed=seed, init=init)

    def forward(self, batch: Any, options: GenerateOptions) -> list[dict[str, Any]]:
        items: list[GenerateItem] = batch
        return [self._one(item, options) for item in items]

    def _one(self, item: GenerateItem, options: GenerateOptions) -> dict[str, Any]:
        """One image: a pipeline call of its own (see the module's docstring)."""
        width, height = self.size(options)
        kwargs: dict[str, Any] = {
            "prompt": item.prompt,
            "num_inference_steps": options.steps,
            "guidance_scale": options.guidance,
            "generator": torch.Generator("cpu").manual_seed(item.seed),
            "output_type": "pil",
        }
        if options.negative_prompt:
            kwargs["negative_prompt"] = options.negative_prompt
        with torch.inference_mode():
            if options.init:
                out = self.image2image(image=item.init, strength=options.strength, **kwargs)
            else:
                out = self.text2image(height=height, width=width, **kwargs)
        (image,) = out.images
        result: dict[str, Any] = {
            "prompt": item.prompt,
            "seed": item.seed,
            "steps": options.steps,
            "guidance": options.guidance,
            "width": image.width,
            "height": image.height,
            IMAGE: image,
        }
        if options.init:
            result["strength"] = options.strength
        return result


def _unet_sample_size(pipe: Any) -> int | None:
    unet = getattr(pipe, "unet", None)
    size = getattr(getattr(unet, "config", None), "sample_size", None)
    return size if isinstance(size, int) else None
