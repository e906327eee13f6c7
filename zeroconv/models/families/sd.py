"""Stable Diffusion 1.x/2.x: one CLIP text encoder, an AutoencoderKL, a UNet2DConditionModel with cross-attention,
DDPM noise with an epsilon or v-prediction target, diffusers' ControlNetModel and lllyasviel's original layout.

The first family (zeroconv.models.families): each method is one place where another family differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zeroconv.errors import UserError
from zeroconv.models.controlnet import DECODER_PREFIXES
from zeroconv.models.parts import Base


def latent_scale_of_folder(location: str, revision: str | None = None) -> int:
    """The VAE's downsampling factor from its config alone."""
    from diffusers import AutoencoderKL

    return 2 ** (len(AutoencoderKL.load_config(location, subfolder="vae", revision=revision)["block_out_channels"]) - 1)


class StableDiffusion:
    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline",
                        "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    decoder_prefixes = DECODER_PREFIXES
    writes_combined_file = True  # lllyasviel's layout: the SD checkpoint plus control_model.*

    # --- which bases are SD ---------------------------------------------------------------------------------
    def matches_unet_config(self, config: dict) -> bool:
        # SDXL's UNet is a UNet2DConditionModel too; its size/crop conditioning sets addition_embed_type
        return config.get("_class_name") == "UNet2DConditionModel" and not config.get("addition_embed_type")

    def matches_keys(self, keys: set[str]) -> bool:
        from zeroconv.models import formats

        has_unet = any(key.startswith(formats.UNET_PREFIX + "input_blocks.") for key in keys)
        has_text = any(key.startswith("cond_stage_model.") for key in keys)  # SDXL: conditioner.embedders.*
        return has_unet and has_text

    # --- the frozen parts -----------------------------------------------------------------------------------
    def load_base(self, location: str, name: str, revision: str | None = None, variant: str | None = None,
                  cache_dir: str | None = None, tokenizer_name: str | None = None, dtype=None,
                  defer_text_encoders: bool = False) -> Base:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        from zeroconv.models.parts import text_encoder

        if Path(location).is_file():
            from zeroconv.models.single_file import load_sd_single_file

            parts = load_sd_single_file(location, tokenizer_name=tokenizer_name, dtype=dtype)
            return Base(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                        DDPMScheduler.from_config(parts["scheduler"].config), family=self)
        common = dict(revision=revision, cache_dir=cache_dir)
        # torch_dtype, not dtype: the spelling both diffusers and transformers (4.x and 5) accept
        weights = dict(variant=variant, torch_dtype=dtype, **common)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or location, subfolder=None if tokenizer_name else
                                                  "tokenizer", use_fast=False, **common)
        return Base(
            tokenizer=tokenizer,
            text_encoder=text_encoder(CLIPTextModel, location, "text_encoder", defer_text_encoders, **weights),
            vae=AutoencoderKL.from_pretrained(location, subfolder="vae", **weights),
            unet=UNet2DConditionModel.from_pretrained(location, subfolder="unet", **weights),
            noise_scheduler=DDPMScheduler.from_pretrained(location, subfolder="scheduler", **common),
            family=self,
        )

    def load_denoiser(self, location: str, name: str, revision: str | None = None, tokenizer_name: str | None = None,
                      prediction_type: str | None = None) -> Base:
        """The UNet alone, and the VAE's downsampling (which sets the condition encoder's depth) from its config
        or keys: what a ControlNet is built from, for `zeroconv init`. No text encoder, tokenizer or VAE is loaded,
        so a single file needs nothing from the Hub. `prediction_type`: a single file's, where it does not say."""
        from diffusers import UNet2DConditionModel

        if Path(location).is_file():
            from zeroconv.models.single_file import read_checkpoint, sd_components, vae_scale_factor_of

            checkpoint, metadata = read_checkpoint(location)
            unet = sd_components(checkpoint, metadata, Path(location), prediction_type, components=("unet",))["unet"]
            return Base(None, None, None, unet, None, family=self, latent_scale=vae_scale_factor_of(checkpoint))
        return Base(None, None, None, UNet2DConditionModel.from_pretrained(location, subfolder="unet", revision=revision),
                    None, family=self, latent_scale=latent_scale_of_folder(location, revision))

    def frozen_encoders(self, base: Base) -> list:
        """The modules that turn a batch into the denoiser's inputs: moved and cast together, and kept off the
        device when a latent cache stands in for them."""
        return [base.vae, base.text_encoder]

    def vae_dtype(self, base: Base, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if base.upcast_vae else dtype

    # --- the ControlNet -------------------------------------------------------------------------------------
    def build_controlnet(self, base: Base, conditioning_channels: int = 3, condition_encoder_init: str | None = None,
                         num_layers: int | None = None, num_extra_conditioning_channels: int = 0,
                         num_double_layers: int = 4, num_single_layers: int = 10):
        """ControlNetModel.from_unet: a copy of the whole UNet encoder, so the depths of the transformer families
        (`num_layers`, `num_double_layers`, `num_single_layers`) are not read; extra condition channels are
        --conditioning_channels here. An unset condition encoder init is zeroconv's default, unit_variance."""
        from zeroconv.models.controlnet import DEFAULT_CONDITION_ENCODER_INIT, build_controlnet

        if num_extra_conditioning_channels:
            raise UserError(f"--num_extra_conditioning_channels {num_extra_conditioning_channels}: an SD ControlNet "
                            "reads the condition image's channels; set --conditioning_channels (1, 3 or 4) instead")

        return build_controlnet(base.unet, base.vae_scale_factor, conditioning_channels,
                                condition_encoder_init or DEFAULT_CONDITION_ENCODER_INIT)

    def build_union_controlnet(self, base: Base, num_control_types: int, conditioning_channels: int = 3,
                               condition_encoder_init: str | None = None, several_per_sample: bool = False,
                               num_double_layers: int = 4, num_single_layers: int = 10):
        """SD 1.x/2.x has no union ControlNet: diffusers' union pipelines are SDXL's, and ControlNetUnionModel's
        control-type embedding is sized by the UNet's addition_time_embed_dim, which SD's UNet does not have."""
        raise UserError(f"--conditioning_image_columns: a union ControlNet cannot be trained on {self.label} "
                        "(diffusers' ControlNetUnionModel needs the UNet's addition_time_embed_dim, which SD 1.x/2.x "
                        "lacks, and its only union pipelines are SDXL's); use an SDXL base, or train one condition "
                        "with --conditioning_image_column")

    def load_controlnet(self, path: str, cache_dir: str | None = None, dtype=None):
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(path, cache_dir=cache_dir, torch_dtype=dtype)

    def pixel_grid_modules(self, controlnet) -> list:
        return [controlnet.controlnet_cond_embedding]  # ControlNetModel's and ControlNetUnionModel's alike

    def encode_condition(self, base: Base, condition: torch.Tensor, generator,
                         control_types: torch.Tensor | None = None) -> torch.Tensor:
        """What the ControlNet reads of the condition image ([0, 1] pixels): the pixels themselves, which its
        condition encoder brings onto the latent grid (a union ControlNet's [B, K, C, H, W] too). No random draw."""
        return condition

    # --- prompts (the latent cache stores what this returns, per distinct caption) --------------------------
    def encode_prompts(self, base: Base, captions: list[str], device) -> dict[str, torch.Tensor]:
        """prompt_embeds: the text encoder's last hidden states, [N, 77, hidden], in the text encoder's dtype."""
        ids = base.tokenizer(captions, max_length=base.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids
        return {"prompt_embeds": base.text_encoder(ids.to(device), return_dict=False)[0]}

    def prompt_shape(self, base: Base) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeds": (base.tokenizer.model_max_length, base.text_encoder.config.hidden_size)}

    # --- one training step ----------------------------------------------------------------------------------
    def noisy_batch(self, scheduler, latents: torch.Tensor, generator, recipe=None):
        """(noisy latents, timesteps, loss target, per-sample loss weights or None): DDPM noise at timesteps from
        the recipe's density (uniform by default); the target is the noise, or the velocity for a v-prediction
        base. Random draws in the textbook order: noise, then timesteps."""
        from zeroconv.models.draws import randn
        from zeroconv.models.noise import NoiseRecipe, draw_timesteps, min_snr_weights

        recipe = recipe or NoiseRecipe()
        noise = randn(latents.shape, generator, latents.device, latents.dtype)
        timesteps = draw_timesteps(recipe, latents.shape[0], scheduler.config.num_train_timesteps, generator,
                                   latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        weights = None if recipe.snr_gamma is None else min_snr_weights(scheduler, timesteps, recipe.snr_gamma)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps), weights
        return noisy, timesteps, noise, weights

    def predicted_clean(self, scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, pred: torch.Tensor):
        """The one-step estimate of the clean latents from the prediction at `timesteps` (with gradients)."""
        alpha_bar = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
        if scheduler.config.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * pred
        return (noisy - (1 - alpha_bar).sqrt() * pred) / alpha_bar.sqrt()

    def decode_latents(self, base: Base, latents: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] from latents, through the frozen VAE decoder (with gradients)."""
        vae = base.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    def denoise(self, unet, controlnet, noisy, timesteps, prompts, condition, micro=None,
                only_mid_control: bool = False, guidance: float | None = None):
        """The frozen UNet's prediction with the ControlNet's residuals (all 13, or the middle one alone). SD has
        no size conditioning and no guidance embedding: `micro` and `guidance` are not read."""
        from zeroconv.models.controlnet import predict_noise

        return predict_noise(unet, controlnet, noisy, timesteps, prompts["prompt_embeds"], condition,
                             only_mid_control=only_mid_control)

    # --- sampling and export --------------------------------------------------------------------------------
    def pipeline(self, base: Base, controlnet=None, *, unet=None, scheduler: str = "unipc"):
        from zeroconv.models.pipeline import build_pipeline

        return build_pipeline(base, controlnet, unet=unet, scheduler=scheduler)

    def controlnet_to_original(self, state_dict: dict, config: dict, prefix: str = "") -> dict:
        from zeroconv.models import formats

        return formats.controlnet_to_original(state_dict, config, prefix=prefix)
