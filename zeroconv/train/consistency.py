"""The consistency reward of ControlNet++ (Li et al., ECCV 2024): does the image the step would make follow its
condition? `--consistency_loss_weight W` adds W x (the distance between the condition re-extracted from that
image and the condition given) to the diffusion loss.

Only lightly noised samples take part (t <= --consistency_max_timestep, 200 of 1000 as the paper): there the
one-step estimate of the clean latents is sharp enough to decode into an image whose condition means something.
Their estimate goes through the frozen VAE decoder and a differentiable extractor
(zeroconv.data.conditions.differentiable; for depth and segmentation a frozen model, loaded once in set-up), so
the gradient reaches the ControlNet through the frozen UNet, VAE and model, which stay frozen. The term is a mean
over the whole batch (samples above the threshold count zero), so its scale does not depend on how many samples
were light. Selecting those samples reads the timesteps back: one host sync a step, only when the reward is on.
"""

from __future__ import annotations

import torch

from zeroconv.config import TrainConfig


def check_consistency(cfg: TrainConfig):
    """The reward's distance builder, (device, dtype) -> distance, for --consistency_condition (or --condition)
    and --consistency_condition_options; checks them without loading a model (preflight) and is called by set-up
    to load it, on the training device in the weight dtype."""
    from zeroconv.data.conditions import parse_options
    from zeroconv.data.conditions.differentiable import OPTIONS_FLAG, check_differentiable

    options = parse_options(cfg.consistency_condition_options, OPTIONS_FLAG)
    return check_differentiable(cfg.consistency_condition or cfg.condition, options,
                                channels=cfg.conditioning_channels)


class ConsistencyReward:
    def __init__(self, distance, weight: float, max_timestep: int):
        self.distance, self.weight, self.max_timestep = distance, weight, max_timestep

    def __call__(self, t, noisy: torch.Tensor, timesteps: torch.Tensor, pred: torch.Tensor,
                 conditions: torch.Tensor) -> torch.Tensor:
        light = (timesteps <= self.max_timestep).nonzero().squeeze(1)
        if light.numel() == 0:
            return pred.new_zeros((), dtype=torch.float32)
        family, base = t.base.family, t.base
        if base.vae.device != noisy.device:  # a latent cache parked it on the CPU
            base.vae.to(noisy.device)
        clean = family.predicted_clean(t.noise_scheduler, noisy[light].float(), timesteps[light], pred[light].float())
        with t.accelerator.autocast():
            images = family.decode_latents(base, clean)
        per_sample = self.distance(images.float(), conditions[light].float())
        return self.weight * per_sample.sum() / pred.shape[0]
