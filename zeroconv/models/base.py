"""Loading the frozen base: a diffusers folder, a hub id, a single .ckpt/.safetensors file, or 'toy'.

`check_base_arg` runs before anything heavy so a typo fails in a second, not after minutes of loading.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from zeroconv.errors import UserError

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_base(name: str) -> str:
    """'toy' -> the shipped toy base's folder; anything else unchanged."""
    if name == "toy":
        from zeroconv import toy_base

        return toy_base()
    return name


def check_base_arg(name: str | None, flag: str = "--pretrained_model_name_or_path", revision: str | None = None,
                   cache_dir: str | None = None) -> None:
    """Fail fast on a base that cannot be loaded: missing path, not a diffusers folder, hub id while offline."""
    if not name:
        raise UserError(f"{flag} is required: a diffusers folder, a hub id, a .safetensors/.ckpt file, or 'toy'")
    path = Path(resolve_base(name))
    if path.exists():
        if path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise UserError(f"{flag} {name}: not a model file (expected {', '.join(SINGLE_FILE_SUFFIXES)})")
            return
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise UserError(f"{flag} {name}: folder has no model_index.json or unet/; expected a diffusers SD "
                            "folder (save one with StableDiffusionPipeline.save_pretrained)")
        return
    if not HUB_ID.match(name):
        raise UserError(f"{flag} {name}: no such file or folder")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model_index.json", cache_dir=cache_dir, revision=revision)
        if not isinstance(cached, str):
            raise UserError(f"{flag} {name}: not a local path, and the hub is offline (HF_HUB_OFFLINE=1) with no "
                            "cached copy; download it first or pass a local folder")


@dataclass
class Base:
    """The frozen parts of a Stable Diffusion model that a ControlNet trains against."""

    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object  # DDPM, for training; sampling builds its own from the same config
    source: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def load_base(name: str, revision: str | None = None, variant: str | None = None, cache_dir: str | None = None,
              tokenizer_name: str | None = None, dtype=None) -> Base:
    """The base's frozen parts; with `dtype` (a torch dtype) their weights are loaded in it. Sampling loads in its
    dtype rather than casting after: diffusers warns on every `.to(dtype)` of a model (zeroconv.models.pipeline)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    check_base_arg(name, revision=revision, cache_dir=cache_dir)
    path = resolve_base(name)
    if Path(path).is_file():
        from zeroconv.models.single_file import load_sd_single_file

        parts = load_sd_single_file(path, tokenizer_name=tokenizer_name, dtype=dtype)
        base = Base(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                    DDPMScheduler.from_config(parts["scheduler"].config), source=name)
    else:
        common = dict(revision=revision, cache_dir=cache_dir)
        # torch_dtype, not dtype: the spelling both diffusers and transformers (4.x and 5) accept
        weights = dict(variant=variant, torch_dtype=dtype, **common)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or path, subfolder=None if tokenizer_name else
                                                  "tokenizer", use_fast=False, **common)
        base = Base(
            tokenizer=tokenizer,
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common),
            source=name,
        )
    for module in (base.text_encoder, base.vae, base.unet):
        module.requires_grad_(False)
        module.eval()
    return base
