"""Stable Diffusion XL: two CLIP text encoders (the second with a projection: its pooled embedding), a UNet whose
"text_time" add-embedding reads that pooled embedding and the size/crop micro-conditioning (add_time_ids), the
same DDPM noise and targets as SD, diffusers' ControlNetModel.from_unet of that UNet, and
StableDiffusionXLControlNetPipeline.

What equals SD's (the noise, the decoder, the ControlNet's original key layout, which names the add-embedding
label_emb.0.0/label_emb.0.2) is inherited from the SD family; what differs is here.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from zeroconv.errors import UserError
from zeroconv.models.families.sd import StableDiffusion
from zeroconv.models.parts import Base


def _offline() -> bool:
    from zeroconv.hub import hub_offline

    return hub_offline()


@contextmanager
def _reading_single_file(name: str):
    """diffusers' errors when a single SDXL file cannot be read (no configs offline, a wrong file) as one line."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - diffusers raises OSError, ValueError, HTTP errors here
        raise UserError(f"{name}: cannot read this SDXL single file "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); without the Hub, pass "
                        "--tokenizer_name a diffusers SDXL folder (e.g. stabilityai/stable-diffusion-xl-base-1.0, "
                        "downloaded) for its configs") from None


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    label = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline",
                        "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    writes_combined_file = False  # no one loads an SDXL checkpoint with a ControlNet inside

    # --- which bases are SDXL -------------------------------------------------------------------------------
    def matches_unet_config(self, config: dict) -> bool:
        return config.get("_class_name") == "UNet2DConditionModel" and config.get("addition_embed_type") == "text_time"

    def matches_keys(self, keys: set[str]) -> bool:
        from zeroconv.models import formats

        has_unet = any(key.startswith(formats.UNET_PREFIX + "input_blocks.") for key in keys)
        return has_unet and any(key.startswith("conditioner.embedders.") for key in keys)

    # --- the frozen parts -----------------------------------------------------------------------------------
    def load_base(self, location: str, name: str, revision: str | None = None, variant: str | None = None,
                  cache_dir: str | None = None, tokenizer_name: str | None = None, dtype=None,
                  defer_text_encoders: bool = False) -> Base:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        from zeroconv.models.parts import text_encoder

        if Path(location).is_file():
            return self.load_single_file(location, name, tokenizer_name, dtype)
        common = dict(revision=revision, cache_dir=cache_dir)
        weights = dict(variant=variant, torch_dtype=dtype, **common)

        def tokenizer(subfolder: str):
            return AutoTokenizer.from_pretrained(tokenizer_name or location, subfolder=None if tokenizer_name else
                                                 subfolder, use_fast=False, **common)

        return Base(
            tokenizer=tokenizer("tokenizer"),
            text_encoder=text_encoder(CLIPTextModel, location, "text_encoder", defer_text_encoders, **weights),
            vae=AutoencoderKL.from_pretrained(location, subfolder="vae", **weights),
            unet=UNet2DConditionModel.from_pretrained(location, subfolder="unet", **weights),
            # SDXL ships an Euler scheduler config; training reads its schedule as DDPM, like diffusers' script
            noise_scheduler=DDPMScheduler.from_pretrained(location, subfolder="scheduler", **common),
            family=self,
            tokenizer_2=tokenizer("tokenizer_2"),
            text_encoder_2=text_encoder(CLIPTextModelWithProjection, location, "text_encoder_2", defer_text_encoders,
                                        **weights),
        )

    def load_single_file(self, location: str, name: str, config: str | None, dtype) -> Base:
        """An original-layout SDXL file (Stability's sd_xl_base_1.0.safetensors layout) through diffusers'
        from_single_file. The file holds no configs: diffusers takes SDXL 1.0's from the Hub, or those of the
        diffusers SDXL folder given as --tokenizer_name (its tokenizers are used too)."""
        from diffusers import DDPMScheduler, StableDiffusionXLPipeline

        with _reading_single_file(name):
            pipe = StableDiffusionXLPipeline.from_single_file(location, config=config, torch_dtype=dtype,
                                                              local_files_only=_offline())
        return Base(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                    DDPMScheduler.from_config(pipe.scheduler.config), family=self,
                    tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)

    def load_denoiser(self, location: str, name: str, revision: str | None = None, tokenizer_name: str | None = None,
                      prediction_type: str | None = None) -> Base:
        """The UNet, as SD's; from a single file with the configs load_single_file uses."""
        if not Path(location).is_file():
            return super().load_denoiser(location, name, revision)
        from diffusers import UNet2DConditionModel

        from zeroconv.models.families import single_file_keys
        from zeroconv.models.single_file import vae_scale_factor_of

        with _reading_single_file(name):
            unet = UNet2DConditionModel.from_single_file(location, config=tokenizer_name, subfolder="unet",
                                                         local_files_only=_offline())
        scale = vae_scale_factor_of(dict.fromkeys(single_file_keys(Path(location))))
        return Base(None, None, None, unet, None, family=self, latent_scale=scale)

    def frozen_encoders(self, base: Base) -> list:
        return [base.vae, base.text_encoder, base.text_encoder_2]

    def vae_dtype(self, base: Base, dtype: torch.dtype) -> torch.dtype:
        # SDXL's VAE overflows in fp16 (force_upcast in its config, as its pipelines read it): encode in float32
        return torch.float32 if base.upcast_vae or base.vae.config.get("force_upcast", False) else dtype

    # --- the ControlNet -------------------------------------------------------------------------------------
    def build_union_controlnet(self, base: Base, num_control_types: int, conditioning_channels: int = 3,
                               condition_encoder_init: str | None = None, several_per_sample: bool = False,
                               num_double_layers: int = 4, num_single_layers: int = 10):
        """A ControlNetUnionModel of `num_control_types` condition types (zeroconv.models.union), the condition
        encoder as the plain ControlNet's (unit_variance unless told otherwise); it takes several types per sample.
        The depths are Flux's and are not read."""
        from zeroconv.models.controlnet import DEFAULT_CONDITION_ENCODER_INIT, build_controlnet

        return build_controlnet(base.unet, base.vae_scale_factor, conditioning_channels,
                                condition_encoder_init or DEFAULT_CONDITION_ENCODER_INIT,
                                num_control_types=num_control_types)

    def load_controlnet(self, path: str, cache_dir: str | None = None, dtype=None):
        """A ControlNetModel, or a ControlNetUnionModel when its config says so."""
        import diffusers

        config = diffusers.ControlNetModel.load_config(path, cache_dir=cache_dir)
        cls = diffusers.ControlNetUnionModel if config.get("_class_name") == "ControlNetUnionModel" else \
            diffusers.ControlNetModel
        return cls.from_pretrained(path, cache_dir=cache_dir, torch_dtype=dtype)

    # --- prompts --------------------------------------------------------------------------------------------
    def encode_prompts(self, base: Base, captions: list[str], device) -> dict[str, torch.Tensor]:
        """prompt_embeds: both encoders' penultimate hidden states, concatenated [N, 77, 768 + 1280];
        pooled_prompt_embeds: the second encoder's projected embedding [N, 1280]. As diffusers' encode_prompt
        (clip_skip None), in the text encoders' dtype."""
        states = []
        for tokenizer, text_encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
            ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids
            out = text_encoder(ids.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled_prompt_embeds": out.text_embeds}

    def prompt_shape(self, base: Base) -> dict[str, tuple[int, ...]]:
        width = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
        return {"prompt_embeds": (base.tokenizer.model_max_length, width),
                "pooled_prompt_embeds": (base.text_encoder_2.config.projection_dim,)}

    # --- one training step ----------------------------------------------------------------------------------
    def denoise(self, unet, controlnet, noisy, timesteps, prompts, condition, micro=None,
                only_mid_control: bool = False, guidance: float | None = None, control_types=None):
        """The frozen UNet's prediction with the ControlNet's residuals; both read the pooled embedding and the
        add_time_ids (original h, w, crop top, left, target h, w) through added_cond_kwargs. A union ControlNet
        reads `control_types` [B, K] and `condition` [B, K, C, H, W]."""
        from zeroconv.models.controlnet import predict_noise

        added = {"text_embeds": prompts["pooled_prompt_embeds"], "time_ids": micro.to(noisy.device, noisy.dtype)}
        return predict_noise(unet, controlnet, noisy, timesteps, prompts["prompt_embeds"], condition,
                             only_mid_control=only_mid_control, added_cond_kwargs=added, control_types=control_types)

    # --- sampling -------------------------------------------------------------------------------------------
    def pipeline(self, base: Base, controlnet=None, *, unet=None, scheduler: str = "unipc"):
        """StableDiffusionXLControlNetPipeline (StableDiffusionXLPipeline without a ControlNet), as
        zeroconv.models.pipeline.build_pipeline builds SD's: the modules as they are, progress bar off."""
        import diffusers

        from zeroconv.models.pipeline import make_scheduler

        modules = dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                       tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2,
                       unet=unet if unet is not None else base.unet, scheduler=make_scheduler(base, scheduler),
                       add_watermarker=False)  # the invisible watermark needs a package training does not
        if controlnet is None:
            pipe = diffusers.StableDiffusionXLPipeline(**modules)
        elif isinstance(controlnet, diffusers.ControlNetUnionModel):
            pipe = union_call()(controlnet=controlnet, **modules)
        else:
            pipe = diffusers.StableDiffusionXLControlNetPipeline(controlnet=controlnet, **modules)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def union_call():
    """StableDiffusionXLControlNetUnionPipeline taking zeroconv's call: image= (the condition) and control_mode (the
    index of its type, the order of --conditioning_image_columns; 0 by default)."""
    import diffusers

    class StableDiffusionXLControlNetUnionPipeline(diffusers.StableDiffusionXLControlNetUnionPipeline):
        def __call__(self, *args, image=None, control_mode: int | list[int] = 0, **kwargs):
            if image is not None:
                images = image if isinstance(image, list) else [image]
                modes = control_mode if isinstance(control_mode, list) else [control_mode]
                kwargs.update(control_image=images, control_mode=modes)
            return super().__call__(*args, **kwargs)

    return StableDiffusionXLControlNetUnionPipeline
