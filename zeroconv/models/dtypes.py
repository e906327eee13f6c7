"""Precision names (the flags' fp16/bf16/fp32, accelerate's "no"), the torch dtypes they stand for, and the dtype a
frozen denoiser's inputs are cast to."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("zeroconv.train")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype frozen weights are held in under accelerate's `mixed_precision` ("no" and None: fp32)."""
    return DTYPES.get(mixed_precision or "no", torch.float32)


# bf16 autocast on a CPU with native bf16 dot products measured 1.6x faster per step on the 3-level base at
# 256 px (bench/RESULTS.md) and no faster on the tiny base at 64 px, where the casts cost what the matmuls save
BF16_AUTO_MIN_RESOLUTION = 256


def native_bf16(device: str) -> bool:
    """Whether this machine runs bf16 matmuls in hardware: a CUDA GPU that supports bf16 (Ampere and later), or a
    CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated, slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_mixed_precision(requested: str | None, resolution: int) -> str:
    """--mixed_precision as accelerate gets it.

    "auto" (the default) defers to accelerate's own setting where there is one (`accelerate launch` and its config
    set ACCELERATE_MIXED_PRECISION); else it is bf16 where the hardware has bf16 matmuls (a CUDA GPU always, a
    CPU from --resolution BF16_AUTO_MIN_RESOLUTION up, where it measured faster) and fp32 elsewhere. bf16, not
    fp16: it needs no loss scaling and does not overflow, so a default can take it without a way to fail. fp16 on
    a machine without CUDA would fail inside autocast's grad scaler, so it falls back to fp32 with a warning."""
    if requested in (None, "auto"):
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            return os.environ["ACCELERATE_MIXED_PRECISION"]
        if torch.cuda.is_available():
            chosen = "bf16" if native_bf16("cuda") else "no"
        else:
            chosen = "bf16" if resolution >= BF16_AUTO_MIN_RESOLUTION and native_bf16("cpu") else "no"
        logger.info("--mixed_precision auto: %s (--mixed_precision no trains in fp32)", chosen)
        return chosen
    if requested == "fp16" and not torch.cuda.is_available():
        logger.warning("--mixed_precision fp16 needs a GPU; training in fp32 on this CPU")
        return "no"
    return requested


def denoiser_input_cast(denoiser) -> torch.dtype | None:
    """The dtype the frozen denoiser's inputs are cast to: its weights' for a half-precision base, None (inputs
    kept as they come) for an fp32 one. Read from a parameter, so a DDP-wrapped denoiser (`--sd_locked false` on
    several processes), which has no .dtype, is read the same."""
    weights = next(denoiser.parameters()).dtype
    return None if weights == torch.float32 else weights


def input_dtype(denoiser, inputs: torch.Tensor) -> torch.dtype:
    """The dtype `inputs` enter the frozen denoiser in (denoiser_input_cast)."""
    return denoiser_input_cast(denoiser) or inputs.dtype
