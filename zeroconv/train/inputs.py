"""From a batch to the denoiser's inputs: latents drawn from the VAE posterior, the prompt encodings (the
family's dict of tensors) with caption dropout, and the size-and-crop micro-conditioning.

Two sources give the same numbers: `LiveEncoders` runs the frozen VAE and text encoders on every batch;
a latent cache (zeroconv.data.cache) stores the posterior's mean and std and the encodings once, and draws
the latent sample with the same generator calls, so a seeded run is the same with or without the cache.
"""

from __future__ import annotations

import torch

from zeroconv.data.dataset import micro_conditioning  # noqa: F401 - the loop imports it here


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, scaling_factor: float,
                   shift_factor: float | None = None) -> torch.Tensor:
    """A fresh sample of the VAE posterior, exactly as DiagonalGaussianDistribution.sample draws it."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std * noise
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def drop_captions(prompts: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], proportion: float,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Replace a random `proportion` of captions' encodings (every tensor of the dict, with one draw a sample) by
    the empty prompt's, without a host sync."""
    if proportion <= 0:
        return prompts
    size = next(iter(prompts.values())).shape[0]
    keep = torch.rand(size, generator=generator, device=generator.device) >= proportion
    out = {}
    for name, value in prompts.items():
        mask = keep.to(value.device).view(-1, *([1] * (value.dim() - 1)))
        out[name] = torch.where(mask, value, empty[name].to(value.device, value.dtype).expand_as(value))
    return out


class LiveEncoders:
    """Runs the frozen VAE and the family's prompt encoder on each batch (no cache)."""

    def __init__(self, base, device, weight_dtype):
        self.base, self.vae = base, base.vae
        self.device, self.weight_dtype = device, weight_dtype
        self.empty_prompts = self.encode_prompts([""])  # constant: the text encoders are frozen

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.base.family.encode_prompts(self.base, captions, self.device)
        return {name: value.to(self.weight_dtype) for name, value in encoded.items()}

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        # the VAE's own dtype: a family may keep it in float32 under mixed precision (SDXL's force_upcast)
        pixels = batch["pixel_values"].to(self.device, self.vae.dtype, non_blocking=True)
        posterior = self.vae.encode(pixels).latent_dist
        config = self.vae.config
        return sample_latents(posterior.mean, posterior.std, generator, config.scaling_factor,
                              getattr(config, "shift_factor", None))

    def prompts(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.encode_prompts(batch["caption"])


class CachedEncoders:
    """Reads a latent cache's (zeroconv.data.cache) batches: draws the latent from the stored posterior mean and
    std with LiveEncoders' generator calls, and takes the stored prompt encodings. The VAE and text encoders
    wait on the CPU, off the training device; validation borrows them (TrainingRun.encoders_to_device)."""

    def __init__(self, empty_prompts: dict[str, torch.Tensor], base, device, weight_dtype):
        self.base, self.device = base, device
        self.empty_prompts = {name: value.to(device, weight_dtype) for name, value in empty_prompts.items()}
        config = base.vae.config
        self.scaling_factor, self.shift_factor = config.scaling_factor, getattr(config, "shift_factor", None)
        self.release()

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        mean = batch["latent_mean"].to(self.device, non_blocking=True)
        std = batch["latent_std"].to(self.device, non_blocking=True)
        return sample_latents(mean, std, generator, self.scaling_factor, self.shift_factor)

    def prompts(self, batch: dict) -> dict[str, torch.Tensor]:
        return {name: value.to(self.device, non_blocking=True) for name, value in batch["prompts"].items()}

    def release(self) -> None:
        """Back to the CPU after validation: the training device keeps only what the step uses."""
        if torch.device(self.device).type == "cpu":
            return
        for module in self.base.family.frozen_encoders(self.base):
            module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
