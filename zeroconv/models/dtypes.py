"""Precision names (the flags' fp16/bf16/fp32, accelerate's "no") and the torch dtypes they stand for."""

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
