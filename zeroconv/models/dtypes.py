"""Precision names (the flags' fp16/bf16/fp32, accelerate's "no"), the torch dtypes they stand for, and the dtype a
frozen denoiser's inputs are cast to."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("zeroconv.train")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype frozen weights are held in under accelerate's `mixed_precision` ("no" and None: fp32)."""
    return DTYPES.get(mixed_precision or "no", torch.float32)


def resolve_mixed_precision(requested: str | None) -> str:
    """--mixed_precision as accelerate gets it: fp16 on a machine without CUDA would fail inside autocast's
    grad scaler, so it falls back to fp32 with a warning."""
    if requested in (None, "no"):
        return requested or "no"
    if requested == "fp16" and not torch.cuda.is_available():
        logger.warning("--mixed_precision fp16 needs a GPU; training in fp32 on this CPU")
        return "no"
    return requested


def input_dtype(denoiser, inputs: torch.Tensor) -> torch.dtype:
    """The dtype the frozen denoiser's inputs are cast to: its weights' (a half-precision base), else the inputs'
    own. Read from a parameter, so a DDP-wrapped denoiser (`--sd_locked false` on several processes), which has no
    .dtype, is read the same."""
    weights = next(denoiser.parameters()).dtype
    return inputs.dtype if weights == torch.float32 else weights
