"""Flux.1: a FluxTransformer2DModel (double-stream blocks, then single-stream ones) on 2x2-packed latents with
rotary image and text ids, CLIP-L's pooled embedding and T5's states as the text, a guidance embedding on the
guidance-distilled bases (FLUX.1-dev), diffusers' FluxControlNetModel.from_transformer and FluxControlNetPipeline.

The noise, the targets and the VAE are SD3's (flow matching, 16 latent channels with a shift), so Flux is SD3's
subclass: what differs is here, as train_controlnet_flux.py does it. Latents stay [N, 16, h, w] everywhere
zeroconv keeps them (cache, noise, loss, the consistency reward's decode); `denoise` packs them into the 2x2
patch sequence the transformer reads and unpacks its prediction, so the elementwise loss is the script's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zeroconv.errors import UserError
from zeroconv.models.dtypes import input_dtype
from zeroconv.models.families.sd3 import StableDiffusion3
from zeroconv.models.parts import Base

# train_controlnet_flux.py's defaults
DEFAULT_DOUBLE_LAYERS, DEFAULT_SINGLE_LAYERS, DEFAULT_GUIDANCE = 4, 10, 3.5
# FluxPipeline's, which the script's encode_prompt call keeps
T5_TOKENS = 512


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, h/2 * w/2, 4C]: FluxPipeline._pack_latents."""
    from diffusers import FluxPipeline

    n, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, n, c, h, w)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for a latent grid of h x w."""
    n, _, channels = packed.shape
    return packed.view(n, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, channels // 4, h, w)


class Flux(StableDiffusion3):
    name = "flux"
    label = "Flux.1"
    pipeline_classes = ("FluxPipeline", "FluxControlNetPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    # every double and single block takes a ControlNet residual; --sd_locked false trains the output head after them
    decoder_prefixes = ("norm_out.", "proj_out.")
    writes_combined_file = False

    # --- which bases are Flux -------------------------------------------------------------------------------
    def matches_unet_config(self, config: dict) -> bool:
        return config.get("_class_name") == "FluxTransformer2DModel"

    def matches_keys(self, keys: set[str]) -> bool:
        return any(key.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for key in keys)

    def refuse_single_file(self, location: str, name: str) -> None:
        if Path(location).is_file():
            raise UserError(f"--pretrained_model_name_or_path {name}: a Flux single file; zeroconv trains Flux from "
                            "a diffusers folder (e.g. black-forest-labs/FLUX.1-dev, or the file's "
                            "FluxPipeline.from_single_file(...).save_pretrained(folder))")

    # --- the frozen parts -----------------------------------------------------------------------------------
    def load_base(self, location: str, name: str, revision: str | None = None, variant: str | None = None,
                  cache_dir: str | None = None, tokenizer_name: str | None = None, dtype=None,
                  defer_text_encoders: bool = False) -> Base:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        from zeroconv.models.parts import text_encoder

        self.refuse_single_file(location, name)
        if tokenizer_name:
            raise UserError(f"--tokenizer_name {tokenizer_name}: Flux has two tokenizers, read from the base's "
                            "tokenizer/ and tokenizer_2/ folders; drop the flag")
        common = dict(revision=revision, cache_dir=cache_dir)
        weights = dict(variant=variant, torch_dtype=dtype, **common)
        return Base(
            tokenizer=AutoTokenizer.from_pretrained(location, subfolder="tokenizer", **common),
            text_encoder=text_encoder(CLIPTextModel, location, "text_encoder", defer_text_encoders, **weights),
            vae=AutoencoderKL.from_pretrained(location, subfolder="vae", **weights),
            unet=FluxTransformer2DModel.from_pretrained(location, subfolder="transformer", **weights),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(location, subfolder="scheduler", **common),
            family=self,
            tokenizer_2=AutoTokenizer.from_pretrained(location, subfolder="tokenizer_2", **common),
            text_encoder_2=text_encoder(T5EncoderModel, location, "text_encoder_2", defer_text_encoders, **weights),
            max_sequence_length=T5_TOKENS,
        )

    def load_denoiser(self, location: str, name: str, revision: str | None = None, tokenizer_name: str | None = None,
                      prediction_type: str | None = None) -> Base:
        """The transformer alone: no text encoder or VAE."""
        from diffusers import FluxTransformer2DModel

        from zeroconv.models.families.sd import latent_scale_of_folder

        self.refuse_single_file(location, name)
        return Base(None, None, None,
                    FluxTransformer2DModel.from_pretrained(location, subfolder="transformer", revision=revision),
                    None, family=self, latent_scale=latent_scale_of_folder(location, revision))

    def frozen_encoders(self, base: Base) -> list:
        return [base.vae, base.text_encoder, base.text_encoder_2]

    # --- the ControlNet -------------------------------------------------------------------------------------
    def build_controlnet(self, base: Base, conditioning_channels: int = 3, condition_encoder_init: str | None = None,
                         num_layers: int | None = None, num_extra_conditioning_channels: int = 0,
                         num_double_layers: int = DEFAULT_DOUBLE_LAYERS,
                         num_single_layers: int = DEFAULT_SINGLE_LAYERS):
        """FluxControlNetModel.from_transformer, as train_controlnet_flux.py calls it: the transformer's first
        `num_double_layers` double-stream and `num_single_layers` single-stream blocks with its embeddings, the
        transformer's head count and width; the condition's patch embedding and every output block are zero, so
        the untrained ControlNet changes nothing. `num_layers` is SD3's depth and is not read."""
        from diffusers import FluxControlNetModel

        if conditioning_channels != 3:
            raise UserError(f"--conditioning_channels {conditioning_channels}: a Flux ControlNet reads the "
                            "condition through the base's VAE, which takes RGB; use 3 (the default)")
        if condition_encoder_init not in (None, "paper"):
            raise UserError(f"--condition_encoder_init {condition_encoder_init}: a Flux ControlNet has no "
                            "condition encoder (the condition is VAE-encoded, packed, then embedded from zero); "
                            "drop the flag")
        if num_extra_conditioning_channels:
            raise UserError(f"--num_extra_conditioning_channels {num_extra_conditioning_channels}: an SD3 option; "
                            "a Flux ControlNet reads the condition's latents only: use 0 (the default)")
        config = base.unet.config
        for flag, wanted, available in (("--num_double_layers", num_double_layers, config.num_layers),
                                        ("--num_single_layers", num_single_layers, config.num_single_layers)):
            if not 0 <= wanted <= available:
                raise UserError(f"{flag} {wanted}: this base's transformer has {available} such blocks; pass 0 to "
                                f"{available} (train_controlnet_flux.py's defaults are {DEFAULT_DOUBLE_LAYERS} and "
                                f"{DEFAULT_SINGLE_LAYERS})")
        return FluxControlNetModel.from_transformer(base.unet, num_layers=num_double_layers,
                                                    num_single_layers=num_single_layers,
                                                    attention_head_dim=config.attention_head_dim,
                                                    num_attention_heads=config.num_attention_heads)

    def build_union_controlnet(self, base: Base, num_control_types: int, conditioning_channels: int = 3,
                               condition_encoder_init: str | None = None, several_per_sample: bool = False,
                               num_double_layers: int = DEFAULT_DOUBLE_LAYERS,
                               num_single_layers: int = DEFAULT_SINGLE_LAYERS):
        """A Flux ControlNet-Union: build_controlnet's, with num_mode = the number of condition types (a learned
        mode embedding, one token before the text; FluxControlNetPipeline's control_mode). It reads one condition
        per sample, so a sample cannot be given several types."""
        from diffusers import FluxControlNetModel
        from diffusers.models.controlnets.controlnet import zero_module

        if several_per_sample:
            raise UserError("--union_extra_condition_probability: a Flux ControlNet-Union reads one condition per "
                            "sample (its control_mode); use 0 (the default): each sample is given one type")
        plain = self.build_controlnet(base, conditioning_channels, condition_encoder_init,
                                      num_double_layers=num_double_layers, num_single_layers=num_single_layers)
        # from_transformer has no num_mode: the same config with it, and the copied weights
        controlnet = FluxControlNetModel.from_config(plain.config, num_mode=num_control_types)
        missing, unexpected = controlnet.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and all(key.startswith("controlnet_mode_embedder.") for key in missing), missing
        controlnet.controlnet_x_embedder = zero_module(controlnet.controlnet_x_embedder)
        return controlnet

    def load_controlnet(self, path: str, cache_dir: str | None = None, dtype=None):
        from diffusers import FluxControlNetModel

        return FluxControlNetModel.from_pretrained(path, cache_dir=cache_dir, torch_dtype=dtype)

    # --- prompts --------------------------------------------------------------------------------------------
    def encode_prompts(self, base: Base, captions: list[str], device) -> dict[str, torch.Tensor]:
        """As FluxPipeline.encode_prompt: prompt_embeds, T5's last hidden states [N, --max_sequence_length, T5
        width]; pooled_prompt_embeds, CLIP-L's pooled output [N, 768]. In the text encoders' dtype."""
        ids = base.tokenizer(captions, max_length=base.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids
        pooled = base.text_encoder(ids.to(device), output_hidden_states=False).pooler_output
        ids = base.tokenizer_2(captions, max_length=base.max_sequence_length, padding="max_length", truncation=True,
                               return_tensors="pt").input_ids
        states = base.text_encoder_2(ids.to(device), output_hidden_states=False)[0]
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}

    def prompt_shape(self, base: Base) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeds": (base.max_sequence_length, base.text_encoder_2.config.d_model),
                "pooled_prompt_embeds": (base.text_encoder.config.hidden_size,)}

    # --- one training step ----------------------------------------------------------------------------------
    def encode_condition(self, base: Base, condition: torch.Tensor, generator,
                         control_types: torch.Tensor | None = None) -> torch.Tensor:
        """SD3's (the condition's VAE latents); for a union ControlNet, of each sample's one given type."""
        if control_types is not None:
            condition = condition[torch.arange(len(condition)), given_type(control_types).to(condition.device)]
        return super().encode_condition(base, condition, generator)

    def denoise(self, unet, controlnet, noisy, timesteps, prompts, condition, micro=None,
                only_mid_control: bool = False, guidance: float | None = None, control_types=None):
        """The frozen transformer's velocity with the ControlNet's double- and single-block residuals, as the
        script's step: both read the packed latents, the image ids of the h/2 x w/2 patch grid, zero text ids,
        the timestep / 1000, and, when the base has a guidance embedding, `guidance` (--guidance_scale, 3.5 by
        default); without a `controlnet`, the transformer's alone. The prediction comes back unpacked to the
        latents' shape. `micro` is not read."""
        if only_mid_control:
            raise UserError("--only_mid_control: a Flux ControlNet has no middle block (its residuals go into the "
                            "transformer's blocks); drop the flag")
        from diffusers import FluxPipeline

        n, _, h, w = noisy.shape
        dtype = input_dtype(unet, noisy)
        text, pooled = prompts["prompt_embeds"].to(dtype), prompts["pooled_prompt_embeds"].to(dtype)
        inputs = dict(
            hidden_states=pack(noisy).to(dtype), timestep=(timesteps / 1000).to(dtype), encoder_hidden_states=text,
            pooled_projections=pooled, txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, dtype),
            guidance=torch.full((n,), DEFAULT_GUIDANCE if guidance is None else guidance, device=noisy.device,
                                dtype=dtype) if getattr(unet, "module", unet).config.guidance_embeds else None)
        # a union ControlNet: each sample's type as the pipeline's control_mode, [B, 1]
        mode = {} if control_types is None else {"controlnet_mode": given_type(control_types).to(noisy.device)[:, None]}
        double = single = None  # controlnet None: the base alone (zeroconv.models.toy_flow pretrains it so)
        if controlnet is not None:
            double, single = controlnet(controlnet_cond=pack(condition).to(dtype), return_dict=False, **mode, **inputs)
        packed = unet(controlnet_block_samples=None if double is None else [r.to(dtype) for r in double],
                      controlnet_single_block_samples=None if single is None else [r.to(dtype) for r in single],
                      return_dict=False, **inputs)[0]
        return unpack(packed, h, w)

    # --- sampling and export: SD3's pipeline method, with Flux's pipelines and modules ----------------------
    # Their guidance_scale is the guidance embedding's value (guidance-distilled bases), not classifier-free guidance.
    pipeline_names = ("FluxControlNetPipeline", "FluxPipeline")

    def pipeline_modules(self, base: Base) -> dict:
        return dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                    text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)

    def controlnet_to_original(self, state_dict: dict, config: dict, prefix: str = "") -> dict:
        raise UserError("zeroconv export: Flux ControlNets have no original (lllyasviel) layout; share the diffusers "
                        "folder (`zeroconv export --format diffusers`), which FluxControlNetPipeline loads")


def given_type(control_types: torch.Tensor) -> torch.Tensor:
    """Each sample's one given condition type, [B] long, from [B, K] bool."""
    return control_types.to(torch.long).argmax(dim=1)
