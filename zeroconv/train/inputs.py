"""From a batch to the UNet's inputs: latents drawn from the VAE posterior, caption embeddings with dropout.

Two sources give the same numbers: `LiveEncoders` runs the frozen VAE and text encoder on every batch;
a latent cache (zeroconv.data.cache) stores the posterior's mean and std and the embeddings once, and draws
the latent sample with the same generator calls, so a seeded run is the same with or without the cache.
"""

from __future__ import annotations

import torch


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, scaling_factor: float,
                   shift_factor: float | None = None) -> torch.Tensor:
    """A fresh sample of the VAE posterior, exactly as DiagonalGaussianDistribution.sample draws it."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std * noise
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def drop_captions(embeds: torch.Tensor, empty_embed: torch.Tensor, proportion: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Replace a random `proportion` of caption embeddings by the empty prompt's, without a host sync."""
    if proportion <= 0:
        return embeds
    keep = torch.rand(embeds.shape[0], generator=generator, device=generator.device) >= proportion
    keep = keep.to(embeds.device).view(-1, *([1] * (embeds.dim() - 1)))
    return torch.where(keep, embeds, empty_embed.to(embeds.dtype).expand_as(embeds))


class LiveEncoders:
    """Runs the frozen VAE and the family's prompt encoder on each batch (no cache)."""

    def __init__(self, base, device, weight_dtype):
        self.base, self.vae = base, base.vae
        self.device, self.weight_dtype = device, weight_dtype
        self.empty_embed = self.encode_prompts([""])  # constant: the text encoder is frozen

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        return self.base.family.encode_prompts(self.base, captions, self.device).to(self.weight_dtype)

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pixels = batch["pixel_values"].to(self.device, self.weight_dtype, non_blocking=True)
        posterior = self.vae.encode(pixels).latent_dist
        config = self.vae.config
        return sample_latents(posterior.mean, posterior.std, generator, config.scaling_factor,
                              getattr(config, "shift_factor", None))

    def prompt_embeds(self, batch: dict) -> torch.Tensor:
        return self.encode_prompts(batch["caption"])


class CachedEncoders:
    """Reads a latent cache's (zeroconv.data.cache) batches: draws the latent from the stored posterior mean and
    std with LiveEncoders' generator calls, and takes the stored caption embeddings. The VAE and text encoder
    wait on the CPU, off the training device; validation borrows them (TrainingRun.encoders_to_device)."""

    def __init__(self, empty_embed: torch.Tensor, base, device, weight_dtype):
        self.base, self.device = base, device
        self.empty_embed = empty_embed.to(device, weight_dtype)
        config = base.vae.config
        self.scaling_factor, self.shift_factor = config.scaling_factor, getattr(config, "shift_factor", None)
        self.release()

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        mean = batch["latent_mean"].to(self.device, non_blocking=True)
        std = batch["latent_std"].to(self.device, non_blocking=True)
        return sample_latents(mean, std, generator, self.scaling_factor, self.shift_factor)

    def prompt_embeds(self, batch: dict) -> torch.Tensor:
        return batch["prompt_embeds"].to(self.device, non_blocking=True)

    def release(self) -> None:
        """Back to the CPU after validation: the training device keeps only what the step uses."""
        if torch.device(self.device).type == "cpu":
            return
        for module in self.base.family.frozen_encoders(self.base):
            module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
