"""Tiny models built locally from configs and saved with ``save_pretrained``, so tests load
them through exactly the ``from_pretrained`` path a hub id takes."""

from __future__ import annotations

from pathlib import Path

import torch

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
