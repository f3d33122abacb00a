"""CLIP-style runners against transformers itself: zero-shot scores equal the
``zero-shot-image-classification`` pipeline's (CLIP's softmax, SigLIP's sigmoid with its
bias, ALIGN's temperature), prompt ensembling is the mean of unit text embeddings, label texts
are embedded once per label set, embeddings are the image tower's unit features. Tiny models
built from configs and loaded from folders, exactly as a hub id loads; no services."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pixelmill.errors import ModelUnavailable
from pixelmill.models.base import Runner
from pixelmill.models.clip import EMBEDDING, RANDOM_CLIP_B32
from pixelmill.models.registry import ZERO_SHOT, create_runner
from pixelmill.tasks import task_options
from pixelmill.tasks.classify import DEFAULT_TEMPLATE, ClassifyOptions
from tests.tiny_models import (
    CLIP_WORDS,
    build_tiny_clip,
    build_tiny_siglip,
    build_tiny_vit_classifier,
)

# Labels in the tiny tokenizers' words (CLIP_WORDS), so no text is tokenised as unknowns only.
LABELS = ["a cat", "a dog", "a receipt"]
OTHER_LABELS = ["a red car", "a blue boat", "a damaged parcel", "a green tree"]
TEMPLATES = ["This is a photo of {}.", "a close up photo of {}", "a picture of {} at night"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


def build_tiny_align(folder: Path) -> Path:
    """Tiny ALIGN (an EfficientNet image tower, a BERT text tower): no ``logit_scale``, it
    divides by a learnt ``temperature``, set here to 0.05 so that scores spread."""
    from transformers import (
        AlignConfig,
        AlignModel,
        AlignProcessor,
        BertTokenizer,
        EfficientNetImageProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *sorted(set(CLIP_WORDS))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    # A wide init, so that labels' texts embed far apart and their scores differ.
    text = {
        "vocab_size": len(words),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 32,
        "initializer_range": 0.5,
    }
    vision = {"image_size": 32, "width_coefficient": 0.1, "depth_coefficient": 0.1,
              "hidden_dim": 64, "num_channels": 3}  # fmt: skip
    config = AlignConfig(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(0)
    model = AlignModel(config).eval()
    with torch.no_grad():
        # The default init leaves this tiny image tower's features near 1e-30: widen it.
        for weight in model.vision_model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.3)
        model.temperature.fill_(0.05)
    model.save_pretrained(folder)
    processor = EfficientNetImageProcessor(size={"height": 32, "width": 32})
    AlignProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_align(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_align(tmp_path_factory.mktemp("tiny-align"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Random-noise PNGs of different sizes and shapes (PNG: lossless; each shorter side under
    twice the tiny models' 32 px, so decoded whole: the runner and the pipeline see the same
    pixels)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    paths = []
    for i, (w, h) in enumerate([(48, 40), (31, 97), (150, 60), (32, 32)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _loaded(kind: str, folder: Path | str, **kwargs: Any) -> Runner[Any]:
    runner = create_runner(kind, str(folder), **kwargs)
    runner.load("cpu")
    return runner


def _classify(runner: Runner[Any], paths: list[Path], options: Any) -> list[dict[str, Any]]:
    return runner.run([runner.prepare(str(p), {}, options) for p in paths], options)


def _as_dict(result: dict[str, Any]) -> dict[str, float]:
    return {x["label"]: x["score"] for x in result["labels"]}


def _features(out: Any) -> torch.Tensor:
    """A ``get_*_features`` output as a tensor (transformers 5 returns a model output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---- zero-shot scores are the pipeline's --------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip", "align"])
@pytest.mark.parametrize("labels", [LABELS, OTHER_LABELS, ["a cat", "a dog"]])
def test_zero_shot_scores_equal_the_pipeline(family, labels, request, images):
    from transformers import pipeline

    folder = request.getfixturevalue(f"tiny_{family}")
    runner = _loaded(ZERO_SHOT, folder, top_k=len(labels))
    options = task_options("classify", {"labels": labels}, str(folder))
    assert isinstance(options, ClassifyOptions) and options.templates == (DEFAULT_TEMPLATE,)
    ours = _classify(runner, images, options)

    if family != "siglip":  # (SigLIP's bias is checked below)
        # Scores far apart, so a wrong scale (exp(logit_scale), ALIGN's 1 / temperature) shows.
        assert max(r["labels"][0]["score"] - r["labels"][-1]["score"] for r in ours) > 0.1
    pipe = pipeline("zero-shot-image-classification", model=str(folder))
    for path, result in zip(images, ours, strict=True):
        theirs = pipe(Image.open(path).convert("RGB"), candidate_labels=labels)
        expected = {x["label"]: x["score"] for x in theirs}
        got = _as_dict(result)
        assert got.keys() == expected.keys()
        for label, score in expected.items():
            assert got[label] == pytest.approx(score, abs=1e-5), (path.name, label)
        scores = [x["score"] for x in result["labels"]]
        assert scores == sorted(scores, reverse=True)  # best first
        if family != "siglip":
            assert sum(scores) == pytest.approx(1.0, abs=1e-5)  # softmax over the labels
    if family == "siglip":
        # Independent sigmoids (they need not sum to 1), and the bias is really applied: the
        # tiny SigLIP's -1.5 pulls every score well under what sigmoid(x) alone would give.
        assert runner.scale_bias()[1] == pytest.approx(-1.5)
        totals = {round(sum(_as_dict(r).values()), 3) for r in ours}
        assert totals != {1.0}


def test_a_siglip_score_without_the_bias_would_differ(tiny_siglip, images):
    """The comparison above could not pass with ``sigmoid(x)``: check the bias is large enough
    to move the scores by far more than the tolerance."""
    runner = _loaded(ZERO_SHOT, tiny_siglip, top_k=3)
    options = task_options("classify", {"labels": LABELS}, str(tiny_siglip))
    got = _as_dict(_classify(runner, images[:1], options)[0])
    image = runner.image_features(runner.collate([runner.prepare(str(images[0]), {}, options)]))
    matrix = runner.label_matrix(options.labels, options.templates)
    scale, bias = runner.scale_bias()
    logits = (image @ matrix.T * scale)[0]
    for i, label in enumerate(LABELS):
        assert got[label] == pytest.approx(float((logits[i] + bias).sigmoid()), abs=1e-6)
        assert abs(got[label] - float(logits[i].sigmoid())) > 0.05


def _smooth(path: Path, size: tuple[int, int]) -> Path:
    """A photo-like image (smooth gradients and a disc), where a box-reduced decode and a
    full one look alike."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    disc = ((x - w * 0.6) ** 2 + (y - h * 0.4) ** 2 < (h * 0.25) ** 2) * 120.0
    rgb = np.stack([x / w * 255, y / h * 200 + disc * 0.3, 255 - x / w * 128 - disc], axis=-1)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_large_image_is_decoded_reduced_to_what_the_model_needs(
    family, tiny_clip, tiny_siglip, tmp_path
):
    """The processors resize to 32 px: a 640x480 image is decoded box-reduced (15x, to
    43x32), not whole; its scores stay close to the pipeline's on the whole image."""
    from transformers import pipeline

    folder = tiny_clip if family == "clip" else tiny_siglip
    runner = _loaded(ZERO_SHOT, folder, top_k=3)
    assert runner.min_side == 32
    path = _smooth(tmp_path / "large.png", (640, 480))
    assert runner.decode(str(path)).size == (43, 32)
    options = task_options("classify", {"labels": LABELS}, str(folder))
    got = _as_dict(_classify(runner, [path], options)[0])
    pipe = pipeline("zero-shot-image-classification", model=str(folder))
    for x in pipe(Image.open(path).convert("RGB"), candidate_labels=LABELS):
        assert got[x["label"]] == pytest.approx(x["score"], abs=0.02)


# ---- prompt ensembling ----------------------------------------------------------------------


def _ensembled_scores(
    folder: Path, path: Path, labels: list[str], templates: list[str]
) -> dict[str, float]:
    """CLIP's prompt ensembling, computed here from the model's own towers: per label, the unit
    text embeddings of its templates averaged and re-normalised."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")
        image = _unit(_features(model.get_image_features(pixel_values=pixels["pixel_values"])))
        rows = []
        for label in labels:
            texts = [t.replace("{}", label) for t in templates]
            tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
            rows.append(_unit(_unit(_features(model.get_text_features(**tokens))).mean(dim=0)))
        logits = image @ torch.stack(rows).T * model.logit_scale.exp()
    probs = logits.softmax(dim=-1)[0]
    return {label: float(p) for label, p in zip(labels, probs, strict=True)}


def test_several_templates_average_the_unit_text_embeddings(tiny_clip, images):
    runner = _loaded(ZERO_SHOT, tiny_clip, top_k=len(OTHER_LABELS))
    options = task_options("classify", {"labels": OTHER_LABELS, "templates": TEMPLATES},
                           str(tiny_clip))  # fmt: skip
    results = _classify(runner, images, options)
    single = _classify(runner, images, task_options("classify", {"labels": OTHER_LABELS},
                                                    str(tiny_clip)))  # fmt: skip
    for path, result, one in zip(images, results, single, strict=True):
        expected = _ensembled_scores(tiny_clip, path, OTHER_LABELS, TEMPLATES)
        got = _as_dict(result)
        for label, score in expected.items():
            assert got[label] == pytest.approx(score, abs=1e-5), (path.name, label)
        # The templates really count: one template alone scores otherwise.
        assert max(abs(got[k] - v) for k, v in _as_dict(one).items()) > 1e-4


# ---- label texts are embedded once per label set --------------------------------------------


def _count_calls(obj: Any, name: str) -> list[int]:
    """A spy: ``obj.name`` still runs, and each call is counted."""
    calls = [0]
    real: Callable[..., Any] = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def test_label_texts_are_embedded_once_per_runner_and_label_set(tiny_clip, images):
    runner = _loaded(ZERO_SHOT, tiny_clip)
    calls = _count_calls(runner.model, "get_text_features")
    options = task_options("classify", {"labels": LABELS}, str(tiny_clip))
    first = [_classify(runner, [p], options) for p in images[:3]]  # 3 batches, same labels
    assert calls[0] == 1
    # The same labels, validated again (a new options object, as the next message brings).
    again = task_options("classify", {"labels": LABELS}, str(tiny_clip))
    assert _classify(runner, images[:1], again) == first[0]
    assert calls[0] == 1
    other = task_options("classify", {"labels": OTHER_LABELS}, str(tiny_clip))
    _classify(runner, images[:2], other)
    _classify(runner, images[2:], other)
    assert calls[0] == 2
    _classify(runner, images[:1], options)  # the first set is still kept
    assert calls[0] == 2
    templated = task_options("classify", {"labels": LABELS, "templates": TEMPLATES},
                             str(tiny_clip))  # fmt: skip
    _classify(runner, images[:1], templated)  # other templates: another set of texts
    assert calls[0] == 3
    assert runner.text_encodings == 3


# ---- top_k ----------------------------------------------------------------------------------


def test_top_k_limits_the_labels_returned(tiny_clip, images):
    options = task_options("classify", {"labels": LABELS}, str(tiny_clip))
    full = _classify(_loaded(ZERO_SHOT, tiny_clip, top_k=3), images[:2], options)
    two = _classify(_loaded(ZERO_SHOT, tiny_clip, top_k=2), images[:2], options)
    many = _classify(_loaded(ZERO_SHOT, tiny_clip, top_k=10), images[:2], options)
    for f, t, m in zip(full, two, many, strict=True):
        assert len(t["labels"]) == 2 and t["labels"] == f["labels"][:2]  # the best two
        assert {x["label"] for x in m["labels"]} == set(LABELS) and m == f


# ---- embed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_embed_returns_unit_float32_image_features_in_order(family, tiny_clip, tiny_siglip,
                                                            images):  # fmt: skip
    from transformers import AutoModel, AutoProcessor

    folder = tiny_clip if family == "clip" else tiny_siglip
    runner = _loaded("embed", folder)
    options = task_options("embed", {}, str(folder))
    order = [images[2], images[0], images[3], images[1], images[0]]
    out = runner.run([runner.prepare(str(p), {}, options) for p in order], options)
    assert len(out) == len(order)

    model = AutoModel.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    for path, result in zip(order, out, strict=True):
        vector = result[EMBEDDING]
        assert isinstance(vector, np.ndarray) and vector.dtype == np.float32
        assert vector.shape == ((16,) if family == "clip" else (32,))  # SigLIP: no projection
        assert result["dim"] == vector.shape[0]
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)
        with torch.no_grad():
            pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")
            expected = _unit(_features(model.get_image_features(**pixels)))[0].numpy()
        np.testing.assert_allclose(vector, expected, atol=1e-5)
    np.testing.assert_allclose(out[1][EMBEDDING], out[4][EMBEDDING], atol=1e-6)  # same image
    assert not np.allclose(out[0][EMBEDDING], out[1][EMBEDDING])


# ---- what is not a dual encoder -------------------------------------------------------------


def test_a_model_that_is_not_a_dual_encoder_is_refused_by_name(tmp_path):
    vit = build_tiny_vit_classifier(tmp_path / "vit")
    for kind in (ZERO_SHOT, "embed"):
        runner = create_runner(kind, str(vit))
        with pytest.raises(ModelUnavailable) as err:
            runner.load("cpu")
        assert str(vit) in str(err.value) and "not a CLIP-style dual encoder" in str(err.value)
        assert "'vit'" in str(err.value)  # its model type
        assert not runner.loaded
    for kind in (ZERO_SHOT, "embed"):
        with pytest.raises(ModelUnavailable) as err:
            create_runner(kind, "efficientnet_lite0")
        assert "efficientnet_lite0" in str(err.value)
        assert "not a CLIP-style dual encoder" in str(err.value)


def test_a_dual_encoder_as_a_plain_classifier_asks_for_labels(tiny_clip):
    """Loading CLIPForImageClassification would give a random head, confidently wrong: refuse."""
    runner = create_runner("classify", str(tiny_clip))
    with pytest.raises(ModelUnavailable) as err:
        runner.load("cpu")
    assert str(tiny_clip) in str(err.value) and "--labels" in str(err.value)
    assert not runner.loaded


def test_zero_shot_options_without_labels_are_refused(tiny_clip, images):
    runner = _loaded(ZERO_SHOT, tiny_clip)
    options = task_options("classify", {}, str(tiny_clip))
    with pytest.raises(ModelUnavailable) as err:
        _classify(runner, images[:1], options)
    assert str(tiny_clip) in str(err.value) and "--labels" in str(err.value)


# ---- the built-in random CLIP ViT-B/32 ------------------------------------------------------


def test_the_builtin_random_clip_has_vit_b32_shapes(images):
    """Built in memory (about 3 s on a CPU), never downloaded."""
    embedder = _loaded("embed", RANDOM_CLIP_B32)
    options = task_options("embed", {}, RANDOM_CLIP_B32)
    out = embedder.run([embedder.prepare(str(p), {}, options) for p in images[:2]], options)
    assert [r["dim"] for r in out] == [512, 512]
    assert embedder.revision == "random" and embedder.min_side == 224
    vision = embedder.model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (224, 32, 768)
    assert all(float(np.linalg.norm(r[EMBEDDING])) == pytest.approx(1.0, abs=1e-5) for r in out)

    classifier = _loaded(ZERO_SHOT, RANDOM_CLIP_B32, top_k=2)
    labels = task_options("classify", {"labels": ["a cat", "a dog", "a car"]}, RANDOM_CLIP_B32)
    (result,) = _classify(classifier, images[:1], labels)
    assert len(result["labels"]) == 2
