"""Latents of pixels through a frozen VAE: what training feeds the denoiser (and SD3's ControlNet, as its condition).

One posterior sample, drawn exactly as diffusers' DiagonalGaussianDistribution.sample draws it but from the run's
generator, then (z - shift_factor) * scaling_factor (shift_factor: SD3's and Flux's VAEs; None for SD's).
"""

from __future__ import annotations

import torch

from zeroconv.models.draws import Generators


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: Generators, scaling_factor: float,
                   shift_factor: float | None = None) -> torch.Tensor:
    """A fresh sample of the VAE posterior, exactly as DiagonalGaussianDistribution.sample draws it (randn_tensor
    takes a generator per sample as well)."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std * noise
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generator: Generators, device) -> torch.Tensor:
    """Latents of `pixels` ([-1, 1]) on `device`; the VAE runs on its own device and dtype."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype, non_blocking=True)).latent_dist
    config = vae.config
    return sample_latents(posterior.mean.to(device), posterior.std.to(device), generator, config.scaling_factor,
                          getattr(config, "shift_factor", None))
