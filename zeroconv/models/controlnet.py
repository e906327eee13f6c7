"""The ControlNet: a trainable copy of the base UNet's encoder, joined to the frozen UNet by zero convolutions.

`build_controlnet` copies the encoder (diffusers' ControlNetModel.from_unet) with a condition encoder as deep as
the VAE: an image-space condition must land on the latent grid, so it downsamples by the VAE's factor (8x for SD,
three stride-2 convs; the paper's 16-32-96-256 channels). `predict_noise` is the joined forward pass used by
training; the pipelines of diffusers do the same at sampling time.
"""

from __future__ import annotations

import math

import torch

from zeroconv.config import CONDITION_ENCODER_INITS
from zeroconv.models.dtypes import input_dtype

# what `zeroconv train` and `zeroconv init` build for a family with a condition encoder (SD, SDXL) when
# --condition_encoder_init is unset: on the Fill demo control appears 5x sooner and ends where the paper's init ends
DEFAULT_CONDITION_ENCODER_INIT = "unit_variance"

# The paper's condition encoder widths for SD's 8x VAE; shallower VAEs (the toy base) take a prefix.
PAPER_CONDITION_CHANNELS = (16, 32, 96, 256)


def condition_encoder_channels(vae_scale_factor: int) -> tuple[int, ...]:
    downsamplings = int(round(math.log2(vae_scale_factor)))
    if 2**downsamplings != vae_scale_factor or not 1 <= downsamplings <= 3:
        raise ValueError(f"VAE scale factor {vae_scale_factor} is not 2, 4 or 8")
    return PAPER_CONDITION_CHANNELS[: downsamplings + 1]


def build_controlnet(unet, vae_scale_factor: int = 8, conditioning_channels: int = 3,
                     condition_encoder_init: str = "paper", num_control_types: int = 0):
    """A fresh ControlNet whose encoder is a copy of `unet`'s and whose zero convs output exactly zero; with
    `num_control_types` a union ControlNet of that many condition types (zeroconv.models.union)."""
    from diffusers import ControlNetModel

    if num_control_types:
        from zeroconv.models.union import build_union_controlnet

        controlnet = build_union_controlnet(unet, condition_encoder_channels(vae_scale_factor), conditioning_channels,
                                            num_control_types)
    else:
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=condition_encoder_channels(vae_scale_factor),
            conditioning_channels=conditioning_channels,
        )
    if condition_encoder_init == "unit_variance":
        init_condition_encoder_unit_variance(controlnet.controlnet_cond_embedding)
    elif condition_encoder_init != "paper":
        raise ValueError(f"condition_encoder_init {condition_encoder_init!r} is not one of {CONDITION_ENCODER_INITS}")
    return controlnet


@torch.no_grad()
def init_condition_encoder_unit_variance(embedding) -> None:
    """He-normal weights (SiLU gain) and zero biases for every conv of the condition encoder but its last.

    PyTorch's default conv init shrinks a signal at every layer behind SiLU, so after the encoder's 4-8 convs the
    condition reaches the zero conv 30-60x weaker than it went in, and its gradient is as weak: the hint path is
    the last to learn, one reason for the "sudden convergence" after thousands of steps. He-normal weights pass it
    on 8x stronger (tests/models/test_controlnet.py). The last conv stays zero, so
    the untrained ControlNet still changes nothing."""
    for conv in [embedding.conv_in, *embedding.blocks]:
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # SiLU's gain is close to ReLU's sqrt(2)
        torch.nn.init.zeros_(conv.bias)


def predict_noise(unet, controlnet, noisy_latents, timesteps, encoder_hidden_states, controlnet_cond,
                  only_mid_control: bool = False, added_cond_kwargs: dict | None = None,
                  control_types: torch.Tensor | None = None):
    """The base UNet's prediction with the ControlNet's residuals added (all 13, or only the middle one).
    `added_cond_kwargs` (SDXL's pooled text embedding and size/crop time ids) go to both networks. A union
    ControlNet (zeroconv.models.union) takes `control_types` [B, K] and `controlnet_cond` [B, K, C, H, W]."""
    if control_types is not None:
        from zeroconv.models.union import union_residuals

        down_residuals, mid_residual = union_residuals(controlnet, noisy_latents, timesteps, encoder_hidden_states,
                                                       controlnet_cond, control_types, added_cond_kwargs)
    else:
        down_residuals, mid_residual = controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
    if only_mid_control:
        # Zeros, not None: diffusers' UNet ignores the mid residual when the down ones are missing. The down zero
        # convs then get no gradient and stay exactly zero, so the saved model behaves the same in any pipeline.
        down_residuals = [torch.zeros_like(r) for r in down_residuals]
    dtype = input_dtype(unet, noisy_latents)
    if added_cond_kwargs is not None:
        added_cond_kwargs = {name: value.to(dtype) for name, value in added_cond_kwargs.items()}
    return unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states=encoder_hidden_states.to(dtype),
        added_cond_kwargs=added_cond_kwargs,
        down_block_additional_residuals=[r.to(dtype) for r in down_residuals],
        mid_block_additional_residual=mid_residual.to(dtype),
        return_dict=False,
    )[0]


# The UNet decoder: what `--sd_locked false` trains (the paper's sd_locked=False).
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


def decoder_parameters(unet):
    return [p for name, p in unet.named_parameters() if name.startswith(DECODER_PREFIXES)]
