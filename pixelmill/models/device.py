"""Per-device choices: precision and autocast. Never touches CUDA at import."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(device: str, precision: str = "auto") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if not device.startswith("cuda"):
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    if device.startswith("cuda") and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype weights are held in: half precision on GPU when chosen, else fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
