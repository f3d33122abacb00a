"""Full-size architectures with random weights, for throughput where real weights cannot be
downloaded (``pixelmill bench --model ...``): they cost the compute of the real models, and
their outputs mean nothing. Built in memory (no download, nothing written), then run through
the same runner code as a hub model.

- ``blip_base_random`` (caption): BLIP base, ViT-B/16 at 384 px + a BERT-base decoder, as
  Salesforce/blip-image-captioning-base. It never emits an end token, so every caption is
  ``max_new_tokens`` long: an upper bound on the real model's cost.
- ``sd_turbo_random`` (generate): the Stable Diffusion 2.1 architecture of stabilityai/sd-turbo
  (865 M-parameter UNet, OpenCLIP ViT-H text encoder, SD VAE, Euler with trailing timesteps),
  512 px by default; being "turbo", 1 step without guidance unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch

from pixelmill.models.caption import Captioner
from pixelmill.models.generate import ImageGenerator

RANDOM_BLIP_BASE = "blip_base_random"
RANDOM_SD_TURBO = "sd_turbo_random"


def byte_level_bpe(
    words: list[str], prefix: str = "", suffix: str = ""
) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """A hand-made byte-level BPE: the 256 byte symbols plus left-to-right merges spelling each
    ``prefix + word + suffix`` as one token (``"Ġcat"`` for GPT-2, ``"cat</w>"`` for CLIP).

    Returns the vocab, the merges and the whole-word tokens. The transformers 5 tokenizer
    constructors need merges as tuples (their ``list[str]`` hint is wrong: "a b" strings raise).
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    if suffix:  # CLIP: every symbol also exists as a word end, e.g. "a</w>"
        for symbol in alphabet:
            vocab[symbol + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    word_tokens = []
    for word in words:
        pieces = [*prefix, *word]
        pieces[-1] += suffix
        current = pieces[0]
        for piece in pieces[1:]:
            if current + piece not in vocab:
                merges.append((current, piece))
                vocab[current + piece] = len(vocab)
            current += piece
        word_tokens.append(current)
    return vocab, merges, word_tokens


def clip_tokenizer(words: list[str], max_length: int) -> Any:
    """A CLIP tokenizer over the byte alphabet plus ``words``, with CLIP's start/end tokens."""
    from transformers import CLIPTokenizer

    vocab, merges, _ = byte_level_bpe(words, suffix="</w>")
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]
    assert len(tokenizer) == len(vocab), (len(tokenizer), len(vocab))
    return tokenizer


def blip_tokenizer(words: list[str]) -> Any:
    """Like Salesforce/blip-*: a BERT WordPiece tokenizer with an extra "[DEC]" bos token.

    transformers 5: ``BertTokenizer`` is the tokenizers-backed class and takes ``vocab=`` (a
    dict or a vocab.txt path); a ``vocab_file=`` keyword is silently ignored (5-token vocab).
    """
    from transformers import BertTokenizer

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate(special + words)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    assert len(tokenizer) == len(vocab), (len(tokenizer), len(vocab))
    return tokenizer


def never_stop(model: Any, tokenizer: Any) -> None:
    """Rule every special token out of a BLIP decoder's LM head (``decoder.bias`` is tied to
    this bias): it never stops early and never emits tokens that decoding would skip."""
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[tokenizer.all_special_ids] = -1e4


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class RandomBlipBase(Captioner):
    def _build(self) -> Any:
        from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

        config = BlipConfig()  # the defaults are BLIP base: ViT-B/16 384 px, BERT-base decoder
        text: Any = config.text_config
        self.tokenizer = blip_tokenizer([f"w{i}" for i in range(text.vocab_size - 6)])
        text.bos_token_id = self.tokenizer.bos_token_id
        text.eos_token_id = text.sep_token_id = self.tokenizer.sep_token_id
        text.pad_token_id = self.tokenizer.pad_token_id
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config)
        never_stop(model, self.tokenizer)
        side = cast(Any, config.vision_config).image_size
        self.image_processor = BlipImageProcessor(size={"height": side, "width": side})
        self.revision = "random"
        return model


class RandomSDTurbo(ImageGenerator):
    def _build(self, dtype: torch.dtype) -> Any:
        torch.manual_seed(0)
        with default_dtype(dtype):  # built in the dtype it runs in: no copy, no cast
            pipe = sd_pipeline(
                clip_tokenizer([], max_length=77),
                text={  # OpenCLIP ViT-H/14's text tower, as in SD 2.x
                    "vocab_size": 49408,
                    "hidden_size": 1024,
                    "intermediate_size": 4096,
                    "num_hidden_layers": 23,
                    "num_attention_heads": 16,
                    "hidden_act": "gelu",
                    "projection_dim": 512,
                },
                unet={
                    "sample_size": 64,
                    "layers_per_block": 2,
                    "block_out_channels": (320, 640, 1280, 1280),
                    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    "cross_attention_dim": 1024,
                    "attention_head_dim": (5, 10, 20, 20),
                    "use_linear_projection": True,
                },
                vae={
                    "block_out_channels": (128, 256, 512, 512),
                    "layers_per_block": 2,
                    "sample_size": 512,
                },
                scheduler={"timestep_spacing": "trailing"},
            )
        self.revision = "random"
        return pipe


def sd_pipeline(
    tokenizer: Any,
    *,
    text: dict[str, Any],
    unet: dict[str, Any],
    vae: dict[str, Any],
    scheduler: dict[str, Any],
) -> Any:
    """A Stable Diffusion pipeline with random weights: a CLIP text model (``text``: its config,
    positions as long as the tokenizer pads), a UNet and a VAE with 4 blocks (so
    ``vae_scale_factor`` is 8) and Euler on the SD noise schedule (``scheduler`` adds to it).
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **text,
            max_position_embeddings=tokenizer.model_max_length,  # prompts are padded to this
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # pooled output is taken at the first eos
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet_model = UNet2DConditionModel(in_channels=4, out_channels=4, **unet)  # type: ignore[no-untyped-call]
    vae_model = AutoencoderKL(  # type: ignore[no-untyped-call]
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **vae,
    )
    # Euler without churn is deterministic given the generators.
    euler = EulerDiscreteScheduler(  # type: ignore[no-untyped-call]
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,  # 0 triggers a deprecation warning in diffusers
        **scheduler,
    )
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet_model,
        scheduler=euler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
