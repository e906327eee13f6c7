"""The loaded base: its frozen parts and its family. Apart from zeroconv.models.base, which loads it, so the
families that build it need not import the loader that calls them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zeroconv.models.families import Family


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

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return self.latent_scale
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type
