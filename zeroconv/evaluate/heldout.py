"""Is control learned, not just run? The held-out diffusion loss with each sample's own condition against the same
loss with the conditions permuted among the samples.

Both losses see the same latents, prompts, noise and timesteps (drawn once from `seed`), so the only difference
is which condition the ControlNet reads. A ControlNet that ignores its condition (an untrained one adds zero) gives
the two equal losses; one that learned to read it predicts the noise better with the true condition. The relative
gap `1 - true / shuffled` is the figure: family-agnostic, it runs through the family's `encode_condition`,
`noisy_batch` and `denoise`, so SD, SDXL, SD3 and Flux are measured by the same code, each on its own training
objective (the loss weights its `noisy_batch` gives: SD3's and Flux's flow matching weighs the noise levels). A union
ControlNet's dataset gives each sample its control types, which are passed on: a dataset that gives every sample
the same one type measures that type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeroconv.data.dataset import collate, micro_conditioning
from zeroconv.models.noise import NoiseRecipe


@torch.no_grad()
def conditioned_losses(base, controlnet, dataset, draws: int = 4, seed: int = 0, device="cpu") -> dict:
    """{"true", "shuffled", "gap"}: the mean denoising loss over `draws` noise draws of every sample of `dataset`
    (a ControlNetDataset, read in its epoch 0, so its flips and crops are fixed too) with its own condition, with
    the condition of the next sample (a cyclic shift: no sample keeps its own), and the relative gap."""
    family = base.family
    batch = collate([dataset[i] for i in range(len(dataset))])
    vae = base.vae
    posterior = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
    latents = posterior.mean.float()  # the posterior's mean: no sampling noise in a held-out figure
    if getattr(vae.config, "shift_factor", None) is not None:
        latents = latents - vae.config.shift_factor
    latents = latents * vae.config.scaling_factor
    prompts = family.encode_prompts(base, batch["caption"], device)
    micro = micro_conditioning(batch).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    # a union ControlNet: which condition types each sample is given, for encode_condition and denoise alike
    union = {"control_types": batch["control_types"]} if "control_types" in batch else {}
    # SD reads the pixels, SD3 and Flux their VAE latents: encoded once, so both losses see the same encoding
    condition = family.encode_condition(base, batch["conditioning_pixel_values"].to(device), generator, **union)
    shifted = condition.roll(1, dims=0)
    totals = {"true": 0.0, "shuffled": 0.0}
    for _ in range(draws):
        noisy, timesteps, target, weights = family.noisy_batch(base.noise_scheduler, latents, generator,
                                                                NoiseRecipe())
        for name, cond in (("true", condition), ("shuffled", shifted)):
            pred = family.denoise(base.unet, controlnet, noisy, timesteps, prompts, cond, micro, **union)
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
            loss = per_sample.mean() if weights is None else (per_sample * weights).mean()  # as the training loss
            totals[name] += loss.item() / draws
    return {**totals, "gap": 1.0 - totals["true"] / totals["shuffled"]}
