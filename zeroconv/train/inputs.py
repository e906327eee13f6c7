"""From a batch to the denoiser's inputs: latents drawn from the VAE posterior, the prompt encodings (the
family's dict of tensors) with caption dropout, and the size-and-crop micro-conditioning.

Two sources give the same numbers: `LiveEncoders` runs the frozen VAE and text encoders on every batch;
a latent cache (zeroconv.data.cache) stores the posterior's mean and std and the encodings once, and draws
the latent sample with the same generator calls, so a seeded run is the same with or without the cache.
"""

from __future__ import annotations

import torch

from zeroconv.data.dataset import micro_conditioning  # noqa: F401 - the loop imports it here
from zeroconv.models.draws import Generators, generator_device, per_sample
from zeroconv.models.latents import encode_latents, sample_latents


def drop_captions(prompts: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], proportion: float,
                  generator: Generators) -> dict[str, torch.Tensor]:
    """Replace a random `proportion` of captions' encodings (every tensor of the dict, with one draw a sample) by
    the empty prompt's, without a host sync."""
    if proportion <= 0:
        return prompts
    size = next(iter(prompts.values())).shape[0]
    device = generator_device(generator)
    keep = per_sample(generator, size, lambda g, n: torch.rand(n, generator=g, device=device)) >= proportion
    out = {}
    for name, value in prompts.items():
        mask = keep.to(value.device).view(-1, *([1] * (value.dim() - 1)))
        out[name] = torch.where(mask, value, empty[name].to(value.device, value.dtype).expand_as(value))
    return out


class LiveEncoders:
    """Runs the frozen VAE and the family's prompt encoder on each batch (no cache)."""

    def __init__(self, base, device, weight_dtype):
        base.materialize()  # deferred text encoders (a run that expected a cache and encodes live after all)
        self.base, self.vae = base, base.vae
        self.device, self.weight_dtype = device, weight_dtype
        self.empty_prompts = self.encode_prompts([""])  # constant: the text encoders are frozen

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.base.family.encode_prompts(self.base, captions, self.device)
        return {name: value.to(self.weight_dtype) for name, value in encoded.items()}

    def latents(self, batch: dict, generator: Generators) -> torch.Tensor:
        # the VAE's own dtype: a family may keep it in float32 under mixed precision (SDXL's force_upcast)
        return encode_latents(self.vae, batch["pixel_values"], generator, self.device)

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

    def latents(self, batch: dict, generator: Generators) -> torch.Tensor:
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
