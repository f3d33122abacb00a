"""The runner contract (``pixelmill.models.base``): explicit load options, so a misspelt one
fails; task options that arrive validated and typed; and the PNG a generated image is stored
as, with its provenance."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from PIL import Image

from pixelmill.models.artifacts import PROVENANCE_KEY, encode_png, provenance
from pixelmill.models.base import IMAGE, LoadOptions, Runner
from pixelmill.models.cache import ModelCache
from pixelmill.models.classify import EfficientNetLite0
from pixelmill.models.null import NullRunner
from pixelmill.models.registry import create_runner
from pixelmill.tasks.caption import CaptionOptions
from pixelmill.tasks.classify import ClassifyOptions
from pixelmill.tasks.generate import GenerateOptions


def test_a_misspelt_runner_option_fails_loudly():
    with pytest.raises(TypeError, match="topk"):
        create_runner("classify", "efficientnet_lite0", topk=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="trust_remote"):
        ModelCache("cpu", trust_remote=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="precison"):
        EfficientNetLite0(precison="fp16")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="tsk"):
        NullRunner(tsk="caption")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        create_runner("caption", "blip_base_random", precision="half")
    with pytest.raises(ValueError, match="unknown precision"):
        LoadOptions(precision="fp61")


def test_runner_options_reach_the_runner():
    runner = create_runner("classify", "efficientnet_lite0", top_k=3, precision="fp16",
                           compile=True)  # fmt: skip
    assert isinstance(runner, EfficientNetLite0) and runner.top_k == 3
    assert runner.loading == LoadOptions(precision="fp16", trust_remote_code=False, compile=True)
    # The flag only has to arrive: the null model loads nothing, so no remote code is run.
    null = create_runner("generate", "null", top_k=3, trust_remote_code=True)
    assert isinstance(null, NullRunner) and null.for_task == "generate"
    assert null.loading.trust_remote_code


class Echo(Runner[CaptionOptions]):
    task = "caption"

    def _load(self, device: str) -> None:
        self.revision = "echo"

    def preprocess(self, image: Image.Image) -> Any:
        return image

    def forward(self, batch: Any, options: CaptionOptions) -> list[dict[str, Any]]:
        return [{"item": item, "max_new_tokens": options.max_new_tokens} for item in batch]


def test_run_takes_the_tasks_validated_options_only():
    runner = Echo("echo")
    runner.load("cpu")
    assert runner.run([1, 2], CaptionOptions(max_new_tokens=3)) == [
        {"item": 1, "max_new_tokens": 3}, {"item": 2, "max_new_tokens": 3}
    ]  # fmt: skip
    with pytest.raises(TypeError, match="CaptionOptions .*task_options.*not dict"):
        runner.run([1], {"max_new_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not GenerateOptions"):
        runner.run([1], GenerateOptions())  # type: ignore[arg-type]
    null = NullRunner(task="generate")  # any task's options
    null.load("cpu")
    assert null.run([None], GenerateOptions()) == [{}]
    assert null.run([None], ClassifyOptions()) == [{}]


def test_a_stored_png_carries_its_provenance_in_a_text_chunk():
    runner = NullRunner(task="generate")
    runner.load("cpu")
    image = Image.effect_noise((16, 8), 40).convert("RGB")
    result = {"prompt": "a lighthouse", "seed": 3, "steps": 2, "guidance": 0.0,
              "tags": ["not", "plain"], IMAGE: image}  # fmt: skip
    made = provenance(runner, "cuda:0", result)
    assert made == {
        "model": "null", "model_revision": "none", "device": "cuda:0", "precision": "fp32",
        "prompt": "a lighthouse", "seed": 3, "steps": 2, "guidance": 0.0,
    }  # fmt: skip
    data = encode_png(image, made)
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.size == (16, 8)
    assert back.convert("RGB").tobytes() == image.tobytes()
    assert json.loads(back.text[PROVENANCE_KEY]) == made  # type: ignore[attr-defined]
    assert encode_png(image, made) == data  # deterministic: a retry stores the same bytes
