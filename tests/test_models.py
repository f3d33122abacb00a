"""Classifiers through the real loading paths: the packaged ImageNet model on real photographs,
and a Hugging Face model from a local folder, checked against transformers' own pipeline."""

from __future__ import annotations

import pytest
from PIL import Image

from pixelmill.errors import ModelUnavailable
from pixelmill.models.cache import ModelCache
from pixelmill.models.classify import EfficientNetLite0, HFClassifier
from pixelmill.models.registry import create_runner
from pixelmill.tasks.classify import ClassifyOptions
from tests.conftest import PHOTOS, skimage_data
from tests.tiny_models import TINY_LABELS, build_tiny_vit_classifier


@pytest.fixture(scope="module")
def lite0():
    runner = EfficientNetLite0(top_k=5)
    runner.load("cpu")
    return runner


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    return build_tiny_vit_classifier(tmp_path_factory.mktemp("tiny-vit"))


def test_default_classifier_names_the_subject_of_real_photographs(lite0):
    names = list(PHOTOS)
    items = [lite0.preprocess(lite0.decode(str(skimage_data() / n))) for n in names]
    outputs = lite0.run(items, ClassifyOptions())
    assert len(outputs) == len(names)
    for name, out in zip(names, outputs, strict=True):
        labels = [x["label"] for x in out["labels"]]
        scores = [x["score"] for x in out["labels"]]
        assert len(labels) == 5
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
        assert PHOTOS[name] & set(labels), f"{name}: expected one of {PHOTOS[name]} in {labels}"


def test_batch_results_equal_one_at_a_time_results(lite0):
    images = [lite0.decode(str(skimage_data() / n)) for n in PHOTOS]
    together = lite0.run([lite0.preprocess(im) for im in images], ClassifyOptions())
    alone = [lite0.run([lite0.preprocess(im)], ClassifyOptions())[0] for im in images]
    for a, b in zip(together, alone, strict=True):
        assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        assert a["labels"][0]["score"] == pytest.approx(b["labels"][0]["score"], abs=1e-4)


def test_hf_classifier_from_a_local_folder_matches_transformers_pipeline(tiny_classifier):
    from transformers import pipeline

    runner = create_runner("classify", str(tiny_classifier), top_k=3)
    assert isinstance(runner, HFClassifier)
    runner.load("cpu")
    image = Image.open(skimage_data() / "coffee.png").convert("RGB")
    ours = runner.run([runner.preprocess(image)], ClassifyOptions())[0]["labels"]
    reference = pipeline("image-classification", model=str(tiny_classifier), device="cpu")
    theirs = reference(image, top_k=3)
    assert [x["label"] for x in ours] == [x["label"] for x in theirs]
    assert [x["score"] for x in ours] == pytest.approx([x["score"] for x in theirs], abs=1e-4)
    assert {x["label"] for x in ours} <= set(TINY_LABELS)


def test_unloadable_model_is_model_unavailable_naming_it(tmp_path):
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    runner = create_runner("classify", str(not_a_model))
    with pytest.raises(ModelUnavailable) as err:
        runner.load("cpu")
    assert str(not_a_model) in str(err.value)
    with pytest.raises(ModelUnavailable, match="neither"):
        create_runner("classify", "not a model name!")


def test_cache_loads_each_model_once(tiny_classifier):
    cache = ModelCache("cpu", size=2)
    first = cache.get("classify", str(tiny_classifier))
    assert cache.get("classify", str(tiny_classifier)) is first
    assert cache.loads == 1


@pytest.mark.slow
def test_compiled_classifier_gives_the_eager_results(tiny_classifier):
    """PIXELMILL_COMPILE: torch.compile on the real loading path (about 20 s on this CPU)."""
    eager = create_runner("classify", str(tiny_classifier), top_k=3)
    compiled = create_runner("classify", str(tiny_classifier), top_k=3, compile=True)
    eager.load("cpu")
    compiled.load("cpu")
    image = Image.open(skimage_data() / "coffee.png").convert("RGB")
    items = [eager.preprocess(image)] * 3
    ours, theirs = compiled.run(items, ClassifyOptions()), eager.run(items, ClassifyOptions())
    assert [x["label"] for x in ours[0]["labels"]] == [x["label"] for x in theirs[0]["labels"]]
    assert ours[0]["labels"][0]["score"] == pytest.approx(theirs[0]["labels"][0]["score"], 1e-4)
    assert type(compiled.model).__name__ == "OptimizedModule"


@pytest.mark.slow
def test_random_full_size_caption_and_generate_models_have_the_real_architectures():
    """The bench's stand-ins for Salesforce/blip-image-captioning-base and stabilityai/sd-turbo
    cost what the real ones cost because they are the same architectures: same parameter
    counts, same input size, same defaults; and they run through the ordinary runners."""
    from pixelmill.models.base import IMAGE
    from pixelmill.tasks import task_options

    def params(module):
        return sum(p.numel() for p in module.parameters())

    blip = create_runner("caption", "blip_base_random")
    blip.load("cpu")
    assert blip.revision == "random"
    # BLIP base captioning: 224.0 M distinct parameters (the hub's 247.4 M also counts the LM
    # head, which shares the word embeddings: 30,524 x 768 = 23.4 M).
    assert 223.5e6 < params(blip.model) < 224.5e6
    assert blip.image_processor.size == {"height": 384, "width": 384}
    photo = Image.open(skimage_data() / "astronaut.png").convert("RGB")
    five = task_options("caption", {"max_new_tokens": 5}, "blip_base_random")
    out = blip.forward(blip.collate([blip.preprocess(photo)]), five)
    assert len(out[0]["caption"].split()) == 5  # never stops early: the upper bound on cost
    del blip

    sd = create_runner("generate", "sd_turbo_random")
    sd.load("cpu")
    pipe = sd.text2image
    assert 865e6 < params(pipe.unet) < 866e6  # SD 2.1 / sd-turbo UNet: 865.9 M
    assert 340e6 < params(pipe.text_encoder) < 341e6  # OpenCLIP ViT-H/14 text tower
    assert 83e6 < params(pipe.vae) < 84e6
    assert sd.default_size == (512, 512)
    opts = task_options("generate", {"width": 64, "height": 64}, "sd_turbo_random")
    assert (opts.steps, opts.guidance) == (1, 0.0)  # "turbo": 1 step, no guidance
    item = sd.prepare("p", {"prompt": "a lighthouse at dusk", "seed": 1}, opts)
    (result,) = sd.forward(sd.collate([item]), opts)
    assert result[IMAGE].size == (64, 64) and (result["width"], result["height"]) == (64, 64)
