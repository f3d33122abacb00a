"""Tiny models built locally from configs and saved with ``save_pretrained``, so tests load
them through exactly the ``from_pretrained`` path a hub id takes."""

from __future__ import annotations

from pathlib import Path

import torch

from pixelmill.models.random_weights import (
    blip_tokenizer,
    byte_level_bpe,
    clip_tokenizer,
    never_stop,
    sd_pipeline,
)

TINY_LABELS = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape"]


def build_tiny_vit_classifier(folder: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(TINY_LABELS),
        id2label=dict(enumerate(TINY_LABELS)),
        label2id={label: i for i, label in enumerate(TINY_LABELS)},
    )
    model = ViTForImageClassification(config).eval()
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Ordinary English words shared by the tiny captioning and text-to-image tokenizers.
_WORDS = (
    "a an the of in on at with and or to from by near under over behind beside inside outside "
    "photo picture image view close up top side front back small large big little old new young "
    "red blue green yellow white black brown gray orange pink purple dark bright "
    "cat dog bird horse cow sheep fish man woman child boy girl person people group "
    "car bus truck bike boat train plane road street city town building house room wall "
    "window door table chair bed sofa cup mug plate bowl food coffee tea cake fruit "
    "tree flower grass field garden park forest mountain hill river lake sea beach sky "
    "cloud sun snow rain water rock sand light shadow sitting standing lying walking "
    "running flying looking holding two three many some"
)
TINY_WORDS: list[str] = _WORDS.split()


def build_tiny_blip_captioner(folder: Path) -> Path:
    """Tiny BLIP captioner: loads with ``AutoProcessor`` + ``AutoModelForImageTextToText``.

    Captions are random words, but never empty (special tokens are masked out of the LM head)
    and depend on the image (a large init scale makes cross attention matter).
    """
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    tokenizer = blip_tokenizer(TINY_WORDS)
    vocab = tokenizer.get_vocab()

    torch.manual_seed(0)
    init = 0.2  # default 0.02 (and 1e-10 for the vision tower) gives image-independent captions
    text_config = BlipTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        initializer_range=init,
        # generate() puts bos at position 0, stops at sep, pads with pad.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        initializer_range=init,
    )
    config = BlipConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=32,
        image_text_hidden_size=32,
        initializer_range=init,
    )
    model = BlipForConditionalGeneration(config).eval()
    never_stop(model, tokenizer)

    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_vit_gpt2_captioner(folder: Path) -> Path:
    """Tiny ViT + GPT-2 ``VisionEncoderDecoderModel``, laid out like
    nlpconnect/vit-gpt2-image-captioning: preprocessor_config.json (ViTImageProcessor) and a
    GPT-2 tokenizer, no processor_config.json. ``AutoModelForImageTextToText`` loads the model;
    ``AutoProcessor`` returns only the tokenizer, so use ``AutoImageProcessor`` + ``AutoTokenizer``.

    Captions are whole words, each with a leading space (e.g. ``" cat red sky"``).
    """
    from transformers import (
        GPT2Config,
        GPT2Tokenizer,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    vocab, merges, word_tokens = byte_level_bpe(TINY_WORDS, prefix="Ġ")
    vocab["<|endoftext|>"] = len(vocab)
    # As in GPT-2: <|endoftext|> is bos, eos, unk and (for generation) pad.
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    assert len(tokenizer) == len(vocab), (len(tokenizer), len(vocab))
    eos = tokenizer.eos_token_id

    torch.manual_seed(1)  # seed and init scale picked so four skimage photos get four captions
    init = 0.5
    encoder = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=init,
    )
    decoder = GPT2Config(
        vocab_size=len(vocab),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        initializer_range=init,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,  # lets the bias trick below touch only the output side
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = eos
    config.pad_token_id = eos
    config.eos_token_id = eos
    model = VisionEncoderDecoderModel(config=config).eval()
    for key in ("decoder_start_token_id", "bos_token_id", "pad_token_id", "eos_token_id"):
        setattr(model.generation_config, key, eos)

    # GPT-2's lm_head has no bias, so make one: hidden unit 0 leaves ln_f as a constant 1, and
    # lm_head column 0 then adds 0 to whole-word logits and -100 to all others (single bytes,
    # partial words, <|endoftext|>): captions are never empty, never stop early, decode cleanly.
    word_ids = tokenizer.convert_tokens_to_ids(word_tokens)
    with torch.no_grad():
        model.decoder.transformer.ln_f.weight[0] = 0.0
        model.decoder.transformer.ln_f.bias[0] = 1.0
        model.decoder.lm_head.weight[:, 0] = -100.0
        model.decoder.lm_head.weight[word_ids, 0] = 0.0

    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_stable_diffusion(folder: Path) -> Path:
    """Tiny Stable Diffusion pipeline folder (model_index.json + unet/vae/text_encoder/tokenizer/
    scheduler) for ``AutoPipelineForText2Image.from_pretrained`` and ``.from_pipe``.

    The VAE has 4 blocks, so ``vae_scale_factor`` is 8 as in real SD; the UNet sample_size is 8,
    so the default output is 64x64. Height and width must be multiples of 8 (the pipeline checks
    that; the UNet itself copes with odd latent sizes). Outputs are noise-like but deterministic
    for a given seed.
    """
    tokenizer = clip_tokenizer(TINY_WORDS, max_length=16)
    torch.manual_seed(0)
    pipe = sd_pipeline(
        tokenizer,
        text={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        unet={
            "sample_size": 8,
            "layers_per_block": 1,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
        vae={
            "block_out_channels": (8, 8, 16, 16),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 64,
        },
        scheduler={},  # the SD 1.x schedule
    )
    pipe.save_pretrained(folder)
    return folder


# Words the tiny CLIP-style tokenizers know: enough for labels, templates and search queries.
CLIP_WORDS = [*TINY_WORDS, "this", "is", "receipt", "parcel", "damaged", "product", "night"]


def _dual_text_config(tokenizer: object, max_positions: int) -> dict[str, object]:
    tok = tokenizer  # a CLIPTokenizer
    return {
        "vocab_size": len(tok),  # type: ignore[arg-type]
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": max_positions,
        "bos_token_id": tok.bos_token_id,  # type: ignore[attr-defined]
        "eos_token_id": tok.eos_token_id,  # type: ignore[attr-defined]
        "pad_token_id": tok.pad_token_id,  # type: ignore[attr-defined]
    }


_DUAL_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                "num_attention_heads": 2, "image_size": 32, "patch_size": 8}  # fmt: skip


def build_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    """Tiny CLIP (32 px, 16-d projections) with a CLIP tokenizer over ``CLIP_WORDS``: loads with
    ``AutoModel`` + ``AutoProcessor`` and with transformers' zero-shot pipeline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer(CLIP_WORDS, max_length=32)
    config = CLIPConfig(
        text_config=_dual_text_config(tokenizer, 32), vision_config=_DUAL_VISION, projection_dim=16
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_siglip(folder: Path, *, seed: int = 0) -> Path:
    """Tiny SigLIP (sigmoid scores, a logit bias; texts padded to 64 tokens as the pipeline
    pads them). Its tokenizer is a CLIP tokenizer (SigLIP's own needs a SentencePiece model
    that cannot be built here); the processor loads it through ``AutoTokenizer``."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = clip_tokenizer(CLIP_WORDS, max_length=64)
    text = _dual_text_config(tokenizer, 64)
    text.pop("bos_token_id")
    config = SiglipConfig(text_config=text, vision_config=_DUAL_VISION)
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():  # a visible bias, so a test can tell sigmoid(x + b) from sigmoid(x)
        model.logit_bias.fill_(-1.5)
    model.save_pretrained(folder)
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    SiglipProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
