"""The loaded base: its frozen parts and its family. Apart from zeroconv.models.base, which loads it, so the
families that build it need not import the loader that calls them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from zeroconv.models.families import Family


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class Deferred:
    """A frozen text encoder not loaded yet: its config (what the latent cache's key and the prompt shapes read) is
    known at once, its weights load on Base.materialize(), which a run served by a complete latent cache and
    without validation never calls. Moves are remembered and applied when it loads."""

    def __init__(self, load: Callable, config, dtype: torch.dtype | None = None):
        self.load, self.config = load, config
        self.dtype, self.device = dtype or torch.float32, None

    def to(self, device=None, dtype=None, **_):
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self


def text_encoder(model_class, location: str, subfolder: str, defer: bool = False, **weights):
    """`model_class.from_pretrained(location, subfolder=...)`; with `defer`, a Deferred of it whose config is read now
    (the config file only: no weights)."""
    def load():
        return model_class.from_pretrained(location, subfolder=subfolder, **weights)

    if not defer:
        return load()
    where = {key: weights[key] for key in ("revision", "cache_dir") if key in weights}
    return Deferred(load, model_class.config_class.from_pretrained(location, subfolder=subfolder, **where),
                    weights.get("torch_dtype"))


@dataclass
class Base:
    """The frozen parts of a Stable Diffusion model that a ControlNet trains against, and their family, which
    knows how to use them."""

    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object  # DDPM, for training; sampling builds its own from the same config
    family: Family
    tokenizer_2: object = None  # SDXL's second text encoder (OpenCLIP ViT-bigG) and its tokenizer
    text_encoder_2: object = None
    tokenizer_3: object = None  # SD3's T5 and its tokenizer (None: a base saved without them)
    text_encoder_3: object = None
    # run options the family reads (zeroconv.train.setup.load_frozen_base sets them from TrainConfig)
    max_sequence_length: int = 77  # T5 tokens of a prompt (--max_sequence_length; SD and SDXL have no T5)
    upcast_vae: bool = False  # --upcast_vae: the VAE runs in float32 whatever the training dtype
    latent_scale: int | None = None  # the VAE's downsampling where the VAE is not loaded (load_denoiser)

    def materialize(self) -> None:
        """Load the Deferred text encoders (frozen, eval mode, where and in the dtype they were moved to)."""
        for name in TEXT_ENCODERS:
            part = getattr(self, name)
            if isinstance(part, Deferred):
                module = part.load().requires_grad_(False).eval()
                if part.device is not None:
                    module.to(part.device)
                if module.dtype != part.dtype:
                    module.to(dtype=part.dtype)
                setattr(self, name, module)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return self.latent_scale
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type
