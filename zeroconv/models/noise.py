"""Which noise levels a training step sees and how much each counts: the recipe knobs of DDPM training.

The families draw their timesteps and loss weights here, so `--timestep_sampling` and `--snr_gamma` mean the same
for every DDPM base (SD 1.x/2.x, SDXL). The densities:

- uniform: t ~ U{0, ..., T-1}, the paper's and diffusers' (the same torch.randint call, so the same draws).
- cubic: t = (1 - u^3) T with u ~ U(0, 1), T2I-Adapter's schedule. P(t <= x) = 1 - (1 - x/T)^(1/3): half the draws
  land above t = 0.875 T, where the layout of the image is decided and a structure condition has the most to say.
- logit_normal: t = sigmoid(z) T with z ~ N(--logit_mean, --logit_std), SD3's density (diffusers.training_utils'
  compute_density_for_timestep_sampling draws it); P(t <= x) = Phi((logit(x/T) - mean) / std).
- cubic_then_uniform: a curriculum, cubic for the first --timestep_switch_fraction of the optimizer steps, then
  uniform: the layout (where the condition says the object is) is learned at high noise, the details it leaves to
  refine at low noise, which cubic starves (P(t <= T/2) is 0.21 under cubic, 0.5 under uniform). Until the switch
  the draws are cubic's, after it uniform's, from the same generator.

Min-SNR weighting (Hang et al. 2023, `--snr_gamma`): each sample's loss is weighted min(SNR(t), gamma) / SNR(t) for
an epsilon target and min(SNR(t), gamma) / (SNR(t) + 1) for a velocity target, as diffusers' training scripts do,
so the nearly-clean timesteps (huge SNR, easy, uninformative) stop dominating the gradient.

Flow matching (SD3, Flux: `--weighting_scheme`, as diffusers' train_controlnet_sd3.py) draws a fraction u from the
scheme's density (diffusers.training_utils.compute_density_for_timestep_sampling: logit_normal, mode with
--mode_scale, else uniform), takes the scheduler's training sigma at index u * T, and weights each sample's loss by
compute_loss_weighting_for_sd3 (sigma_sqrt: sigma^-2, cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2)), else 1). The
DDPM fields above are not read there, nor these by DDPM bases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from zeroconv.models.draws import Generators, per_sample

TIMESTEP_SAMPLINGS = ("uniform", "cubic", "logit_normal", "cubic_then_uniform")
# what `zeroconv train` draws for a DDPM base when --timestep_sampling is unset: the paper's. cubic and
# cubic_then_uniform learn control sooner from the paper's init, but on the demo (unit-variance init, the default)
# neither won after step 150 (bench/RESULTS.md)
DDPM_DEFAULT_SAMPLING = "uniform"
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@dataclass(frozen=True)
class NoiseRecipe:
    """The noise-level knobs of a run (from TrainConfig). These defaults are the paper's, so a family called without
    a recipe takes the textbook step; a run's unset --timestep_sampling arrives as None (DDPM_DEFAULT_SAMPLING for
    a DDPM base)."""

    timestep_sampling: str | None = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    snr_gamma: float | None = None
    # flow matching only (SD3, Flux); the defaults are diffusers' train_controlnet_sd3.py's
    weighting_scheme: str = "logit_normal"
    mode_scale: float = 1.29
    precondition_outputs: bool = True
    # cubic_then_uniform: the first optimizer step (0-based) that draws uniform, and the step being drawn for
    switch_step: int = 0
    step: int = 0

    def at_step(self, step: int) -> "NoiseRecipe":
        """The recipe of optimizer step `step` (0-based), for a density that changes over the run."""
        return replace(self, step=step)


def draw_timesteps(recipe: NoiseRecipe, batch_size: int, num_train_timesteps: int, generator: Generators,
                   device) -> torch.Tensor:
    """Integer timesteps in [0, num_train_timesteps), one per sample, from the recipe's density (None: the DDPM
    default of `zeroconv train`, DDPM_DEFAULT_SAMPLING); with a generator per sample, each draws its own."""
    return per_sample(generator, batch_size,
                      lambda g, n: timesteps_of_density(recipe, n, num_train_timesteps, g, device))


def timesteps_of_density(recipe: NoiseRecipe, batch_size: int, num_train_timesteps: int, generator: torch.Generator,
                         device) -> torch.Tensor:
    sampling = recipe.timestep_sampling or DDPM_DEFAULT_SAMPLING
    if sampling == "cubic_then_uniform":
        sampling = "cubic" if recipe.step < recipe.switch_step else "uniform"
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()
    if sampling == "cubic":
        u = torch.rand((batch_size,), generator=generator, device=device)
        fraction = 1.0 - u ** 3
    elif sampling == "logit_normal":
        from diffusers.training_utils import compute_density_for_timestep_sampling

        fraction = compute_density_for_timestep_sampling("logit_normal", batch_size, recipe.logit_mean,
                                                         recipe.logit_std, device=device, generator=generator)
    else:
        raise ValueError(f"unknown timestep sampling {sampling!r}; one of {TIMESTEP_SAMPLINGS}")
    return (fraction * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma, for the scheduler's prediction type."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def draw_flow_indices(recipe: NoiseRecipe, batch_size: int, num_train_timesteps: int, generator: Generators,
                      device) -> torch.Tensor:
    """Indices into a FlowMatchEulerDiscreteScheduler's training schedule, one per sample, from the density of
    --weighting_scheme: u from diffusers' compute_density_for_timestep_sampling, then (u * T).long() as the SD3
    script does (its timesteps run from high noise to low, so u near 1 is nearly clean)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = per_sample(generator, batch_size, lambda g, n: compute_density_for_timestep_sampling(
        recipe.weighting_scheme, n, recipe.logit_mean, recipe.logit_std, recipe.mode_scale, device=device,
        generator=g))
    return (u * num_train_timesteps).long()


def flow_loss_weights(recipe: NoiseRecipe, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of a flow-matching step, for a velocity target (noise - latents).

    diffusers' compute_loss_weighting_for_sd3 for the scheme; with --precondition_outputs (EDM's, the SD3 script's
    default) also sigma^2: the script's preconditioned loss w (noisy - sigma pred - latents)^2 is
    w sigma^2 (pred - (noise - latents))^2, since noisy - latents = sigma (noise - latents). The prediction thus
    stays a velocity for every caller (the consistency reward's one-step estimate reads it as one)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weights = compute_loss_weighting_for_sd3(recipe.weighting_scheme, sigmas).float()
    if recipe.precondition_outputs:
        weights = weights * sigmas.float() ** 2
    return weights
