"""Stable Diffusion 3 / 3.5: CLIP-L and CLIP-G (both with a projection: their pooled embeddings) and an optional
T5, an AutoencoderKL with a shift_factor, an SD3Transformer2DModel, flow matching on FlowMatchEulerDiscreteScheduler's
sigmas, diffusers' SD3ControlNetModel.from_transformer and StableDiffusion3ControlNetPipeline.

The step is diffusers' train_controlnet_sd3.py's: latents (x - shift) * scale; sigmas from --weighting_scheme's
density; noisy = (1 - sigma) x + sigma noise; the ControlNet reads the condition's VAE latents and its
residuals go into the frozen transformer's blocks (block_controlnet_hidden_states); the target is the velocity
noise - x, weighted per sample (zeroconv.models.noise.flow_loss_weights, which also carries
--precondition_outputs). One difference from the script: the condition is encoded from [-1, 1] pixels, as
StableDiffusion3ControlNetPipeline's image processor hands them to the VAE at sampling time (the script encodes
[0, 1] pixels, so its ControlNets see other latents in training than in its own pipeline).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zeroconv.errors import UserError
from zeroconv.models.dtypes import input_dtype
from zeroconv.models.parts import Base

# What the SD3 script's from_transformer call gets by default: diffusers' default depth (12 blocks).
DEFAULT_NUM_LAYERS = 12


class StableDiffusion3:
    name = "sd3"
    label = "Stable Diffusion 3/3.5"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline",
                        "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    # every joint block takes a ControlNet residual; --sd_locked false trains the output head after them
    decoder_prefixes = ("norm_out.", "proj_out.")
    writes_combined_file = False

    # --- which bases are SD3 --------------------------------------------------------------------------------
    def matches_unet_config(self, config: dict) -> bool:
        return config.get("_class_name") == "SD3Transformer2DModel"

    def matches_keys(self, keys: set[str]) -> bool:
        return any(key.startswith("model.diffusion_model.joint_blocks.") for key in keys)

    # --- the frozen parts -----------------------------------------------------------------------------------
    def load_base(self, location: str, name: str, revision: str | None = None, variant: str | None = None,
                  cache_dir: str | None = None, tokenizer_name: str | None = None, dtype=None,
                  defer_text_encoders: bool = False) -> Base:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        from zeroconv.models.parts import text_encoder

        self.refuse_single_file(location, name)
        if tokenizer_name:
            raise UserError(f"--tokenizer_name {tokenizer_name}: SD3 has three tokenizers, read from the base's "
                            "tokenizer/, tokenizer_2/ and tokenizer_3/ folders; drop the flag")
        common = dict(revision=revision, cache_dir=cache_dir)
        weights = dict(variant=variant, torch_dtype=dtype, **common)
        folder = Path(location)

        def tokenizer(subfolder: str):
            return AutoTokenizer.from_pretrained(location, subfolder=subfolder, **common)

        # SD3 allows a base without T5 (its pipeline then uses zero T5 embeddings); only a local folder can say so
        has_t5 = not folder.is_dir() or (folder / "text_encoder_3").is_dir()
        return Base(
            tokenizer=tokenizer("tokenizer"),
            text_encoder=text_encoder(CLIPTextModelWithProjection, location, "text_encoder", defer_text_encoders,
                                      **weights),
            vae=AutoencoderKL.from_pretrained(location, subfolder="vae", **weights),
            unet=SD3Transformer2DModel.from_pretrained(location, subfolder="transformer", **weights),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(location, subfolder="scheduler", **common),
            family=self,
            tokenizer_2=tokenizer("tokenizer_2"),
            text_encoder_2=text_encoder(CLIPTextModelWithProjection, location, "text_encoder_2", defer_text_encoders,
                                        **weights),
            tokenizer_3=tokenizer("tokenizer_3") if has_t5 else None,
            text_encoder_3=text_encoder(T5EncoderModel, location, "text_encoder_3", defer_text_encoders, **weights)
            if has_t5 else None,
        )

    def refuse_single_file(self, location: str, name: str) -> None:
        if Path(location).is_file():
            raise UserError(f"--pretrained_model_name_or_path {name}: an SD3 single file; zeroconv trains SD3 from "
                            "a diffusers folder (e.g. stabilityai/stable-diffusion-3.5-medium, or the file's "
                            "StableDiffusion3Pipeline.from_single_file(...).save_pretrained(folder))")

    def load_denoiser(self, location: str, name: str, revision: str | None = None, tokenizer_name: str | None = None,
                      prediction_type: str | None = None) -> Base:
        """The transformer alone: no text encoder or VAE."""
        from diffusers import SD3Transformer2DModel

        from zeroconv.models.families.sd import latent_scale_of_folder

        self.refuse_single_file(location, name)
        return Base(None, None, None,
                    SD3Transformer2DModel.from_pretrained(location, subfolder="transformer", revision=revision),
                    None, family=self, latent_scale=latent_scale_of_folder(location, revision))

    def frozen_encoders(self, base: Base) -> list:
        return [m for m in (base.vae, base.text_encoder, base.text_encoder_2, base.text_encoder_3) if m is not None]

    def vae_dtype(self, base: Base, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if base.upcast_vae or base.vae.config.get("force_upcast", False) else dtype

    # --- the ControlNet -------------------------------------------------------------------------------------
    def build_controlnet(self, base: Base, conditioning_channels: int = 3, condition_encoder_init: str | None = None,
                         num_layers: int = DEFAULT_NUM_LAYERS, num_extra_conditioning_channels: int = 0,
                         num_double_layers: int = 4, num_single_layers: int = 10):
        """SD3ControlNetModel.from_transformer: the transformer's first `num_layers` joint blocks, embeddings
        copied; its condition input (a patch embedding of the condition's latents) and its output blocks are
        zero, so the untrained ControlNet changes nothing."""
        from diffusers import SD3ControlNetModel

        if conditioning_channels != 3:
            raise UserError(f"--conditioning_channels {conditioning_channels}: an SD3 ControlNet reads the "
                            "condition through the base's VAE, which takes RGB; use 3 (the default)")
        if condition_encoder_init not in (None, "paper"):
            raise UserError(f"--condition_encoder_init {condition_encoder_init}: an SD3 ControlNet has no "
                            "condition encoder (the condition is VAE-encoded, then patch-embedded from zero); "
                            "drop the flag")
        available = base.unet.config.num_layers
        if not 1 <= num_layers < available:
            # the transformer's last joint block has no text output (context_pre_only), so a copy stops before it
            raise UserError(f"--num_layers {num_layers}: this base's transformer has {available} joint blocks, "
                            f"so the ControlNet copies 1 to {available - 1} of them (diffusers' default is 12); "
                            f"pass --num_layers {min(DEFAULT_NUM_LAYERS, available - 1)}")
        if num_extra_conditioning_channels:
            raise UserError(f"--num_extra_conditioning_channels {num_extra_conditioning_channels}: the extra "
                            "channels (an inpainting mask) need a dataset that supplies them, which zeroconv does "
                            "not have yet; use 0 (the default)")
        return SD3ControlNetModel.from_transformer(base.unet, num_layers=num_layers,
                                                   num_extra_conditioning_channels=num_extra_conditioning_channels)

    def build_union_controlnet(self, base: Base, num_control_types: int, conditioning_channels: int = 3,
                               condition_encoder_init: str | None = None, several_per_sample: bool = False,
                               num_double_layers: int = 4, num_single_layers: int = 10):
        """diffusers' SD3ControlNetModel has no control-type input (no union SD3 ControlNet or pipeline)."""
        raise UserError(f"--conditioning_image_columns: a union ControlNet cannot be trained on {self.label} "
                        "(diffusers' SD3ControlNetModel has no control mode); use an SDXL or Flux base, or train "
                        "one condition with --conditioning_image_column")

    def load_controlnet(self, path: str, cache_dir: str | None = None, dtype=None):
        from diffusers import SD3ControlNetModel

        return SD3ControlNetModel.from_pretrained(path, cache_dir=cache_dir, torch_dtype=dtype)

    def pixel_grid_modules(self, controlnet) -> list:
        return []  # the condition enters as VAE latents (Flux's too): every part runs on the latent grid

    def encode_condition(self, base: Base, condition: torch.Tensor, generator) -> torch.Tensor:
        """The ControlNet's input: the condition's VAE latents, a posterior sample (as the SD3 script and
        pipeline), (z - shift) * scale, from pixels mapped to [-1, 1] as the pipeline's image processor does.
        On the VAE's device: a cached run keeps the VAE off the training device."""
        from zeroconv.models.latents import encode_latents

        return encode_latents(base.vae, condition * 2 - 1, generator, condition.device)

    # --- prompts --------------------------------------------------------------------------------------------
    def encode_prompts(self, base: Base, captions: list[str], device) -> dict[str, torch.Tensor]:
        """As StableDiffusion3Pipeline.encode_prompt (clip_skip None): prompt_embeds [N, 77 + T5 length, T5
        width], both CLIPs' penultimate hidden states side by side, zero-padded to T5's width, then T5's last
        hidden states (zeros of the transformer's joint_attention_dim when the base has no T5);
        pooled_prompt_embeds [N, 768 + 1280], both CLIPs' projected embeddings. In the text encoders' dtype."""
        states, pooled = [], []
        for tokenizer, text_encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
            ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids
            out = text_encoder(ids.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(states, dim=-1)
        length, width = self.t5_shape(base)
        if base.text_encoder_3 is None:
            t5 = torch.zeros((len(captions), length, width), device=clip.device, dtype=clip.dtype)
        else:
            ids = base.tokenizer_3(captions, max_length=length, padding="max_length", truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids
            t5 = base.text_encoder_3(ids.to(device))[0]
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def t5_shape(self, base: Base) -> tuple[int, int]:
        width = (base.unet.config.joint_attention_dim if base.text_encoder_3 is None
                 else base.text_encoder_3.config.d_model)
        return base.max_sequence_length, width

    def prompt_shape(self, base: Base) -> dict[str, tuple[int, ...]]:
        length, width = self.t5_shape(base)
        pooled = base.text_encoder.config.projection_dim + base.text_encoder_2.config.projection_dim
        return {"prompt_embeds": (base.tokenizer.model_max_length + length, width), "pooled_prompt_embeds": (pooled,)}

    # --- one training step ----------------------------------------------------------------------------------
    def noisy_batch(self, scheduler, latents: torch.Tensor, generator, recipe=None):
        """(noisy latents, timesteps, velocity target noise - latents, per-sample weights): the SD3 script's flow
        matching. Random draws in its order: noise, then the density's u."""
        from zeroconv.models.draws import randn
        from zeroconv.models.noise import NoiseRecipe, draw_flow_indices, flow_loss_weights

        recipe = recipe or NoiseRecipe()
        if recipe.timestep_sampling not in (None, "uniform") or recipe.snr_gamma is not None:
            raise UserError("--timestep_sampling and --snr_gamma are DDPM options; an SD3 base draws its noise "
                            "levels from --weighting_scheme (logit_normal, mode, cosmap, sigma_sqrt, none); drop them")
        noise = randn(latents.shape, generator, latents.device, latents.dtype)
        indices = draw_flow_indices(recipe, latents.shape[0], scheduler.config.num_train_timesteps, generator,
                                    latents.device).cpu()
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        return noisy, timesteps, noise - latents, flow_loss_weights(recipe, sigmas.flatten())

    def predicted_clean(self, scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, pred: torch.Tensor):
        """x = noisy - sigma v: the one-step estimate from the velocity at `timesteps` (with gradients)."""
        schedule = scheduler.timesteps.to(timesteps.device)
        index = (schedule[None, :] == timesteps[:, None]).float().argmax(dim=1).cpu()
        sigmas = scheduler.sigmas[index].to(noisy.device, noisy.dtype).view(-1, *[1] * (noisy.ndim - 1))
        return noisy - sigmas * pred

    def decode_latents(self, base: Base, latents: torch.Tensor) -> torch.Tensor:
        vae = base.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    def denoise(self, unet, controlnet, noisy, timesteps, prompts, condition, micro=None,
                only_mid_control: bool = False, guidance: float | None = None):
        """The frozen transformer's velocity with the ControlNet's block residuals (block_controlnet_hidden_states);
        both read the sequence and pooled embeddings; without a `controlnet`, the transformer's alone. SD3 has no
        size conditioning and no guidance embedding: `micro` and `guidance` are not read. (`num_double_layers`, `num_single_layers` are Flux's depths.)"""
        if only_mid_control:
            raise UserError("--only_mid_control: an SD3 ControlNet has no middle block (its residuals go into the "
                            "transformer's joint blocks); drop the flag")
        text, pooled = prompts["prompt_embeds"], prompts["pooled_prompt_embeds"]
        dtype = input_dtype(unet, noisy)
        residuals = None  # controlnet None: the base alone (zeroconv.models.toy_flow pretrains it so)
        if controlnet is not None:
            residuals = [r.to(dtype) for r in controlnet(
                hidden_states=noisy, controlnet_cond=condition, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=timesteps, return_dict=False)[0]]
        return unet(hidden_states=noisy.to(dtype), timestep=timesteps, encoder_hidden_states=text.to(dtype),
                    pooled_projections=pooled.to(dtype), block_controlnet_hidden_states=residuals,
                    return_dict=False)[0]

    # --- sampling and export --------------------------------------------------------------------------------
    # diffusers' pipelines of this family: with a ControlNet, and the base alone
    pipeline_names = ("StableDiffusion3ControlNetPipeline", "StableDiffusion3Pipeline")

    def pipeline_modules(self, base: Base) -> dict:
        """The frozen modules the family's pipelines take, by their argument names (not the denoiser)."""
        return dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                    text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                    text_encoder_3=base.text_encoder_3, tokenizer_3=base.tokenizer_3)

    def pipeline(self, base: Base, controlnet=None, *, unet=None, scheduler: str = "unipc"):
        """The family's ControlNet pipeline (its base pipeline without a ControlNet), called the way zeroconv
        calls SD's: `image=` is its control_image, and its prompts are encoded with the run's
        --max_sequence_length. It samples with the base's flow-matching Euler scheduler; `scheduler` names DDPM
        samplers and is not read."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        modules = dict(transformer=unet if unet is not None else base.unet, **self.pipeline_modules(base),
                       scheduler=FlowMatchEulerDiscreteScheduler.from_config(base.noise_scheduler.config))
        with_controlnet, alone = self.pipeline_names
        parent = with_controlnet if controlnet is not None else alone
        pipe = zeroconv_call(parent)(**modules, **({} if controlnet is None else {"controlnet": controlnet}))
        pipe.max_sequence_length = base.max_sequence_length
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def controlnet_to_original(self, state_dict: dict, config: dict, prefix: str = "") -> dict:
        raise UserError("zeroconv export: SD3 ControlNets have no original (lllyasviel) layout; share the diffusers "
                        "folder, which StableDiffusion3ControlNetPipeline loads")


def zeroconv_call(name: str):
    """diffusers' pipeline `name`, taking zeroconv's call: image= (the condition), guess_mode (these transformer
    pipelines have none) and the run's T5 length by default."""
    import diffusers

    parent = getattr(diffusers, name)

    class Pipeline(parent):
        def __call__(self, *args, image=None, guess_mode: bool = False, **kwargs):
            if guess_mode:
                raise UserError(f"--guess_mode: {name} has no guess mode; drop the flag")
            kwargs.setdefault("max_sequence_length", self.max_sequence_length)
            if image is not None:
                kwargs["control_image"] = image
            return super().__call__(*args, **kwargs)

    Pipeline.__name__ = Pipeline.__qualname__ = name
    return Pipeline
