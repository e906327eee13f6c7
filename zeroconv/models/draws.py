"""The random draws of a training batch, one generator per sample.

A sample's VAE posterior draw, diffusion noise, timestep, caption drop (and an SD3/Flux condition's posterior
draw) come from its own generator, seeded by (run seed, optimizer step, sample index), in that order. So a sample
draws the same numbers whichever process, data-loader worker or micro-batch it lands in: a run gives the same
model on 1 or N processes at the same global batch, however the batch is split into micro-batches, and a resumed
run draws what the uninterrupted one drew with no generator state to save (issue 16).

Every draw site takes `Generators`: a list (one per sample, what training passes) or one torch.Generator for the
whole batch, the textbook's draws, which the reference-step tests and bench/step_compare.py feed.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

Generators = Union[torch.Generator, list[torch.Generator]]
# how a run's random draws are made, recorded where runs are compared by their settings (bench/learn_race.py): the
# same flags drew other numbers before (one generator for the whole batch)
DRAWS = "per sample: (seed, step, index)"


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 64-bit seed for (run seed, optimizer step, sample index), well mixed (numpy's SeedSequence) so that
    neighbouring steps and indices get unrelated streams."""
    words = np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, step, index]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def sample_generators(seed: int, step: int, indices, device) -> list[torch.Generator]:
    """One generator per sample of a micro-batch (`indices`: the samples' dataset indices), on `device`."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, step, int(i))) for i in indices]


def per_sample(generator: Generators, batch_size: int, draw: Callable[[torch.Generator, int], torch.Tensor]):
    """`draw(generator, n)` for a batch of `batch_size`: one call for a single generator, else one call of n = 1
    per sample with its own generator, concatenated along the batch."""
    if isinstance(generator, torch.Generator):
        return draw(generator, batch_size)
    if len(generator) != batch_size:
        raise ValueError(f"{len(generator)} generators for a batch of {batch_size}")
    return torch.cat([draw(g, 1) for g in generator])


def randn(shape, generator: Generators, device, dtype) -> torch.Tensor:
    """Standard normal noise of `shape` (batch first)."""
    rest = tuple(shape[1:])
    return per_sample(generator, shape[0],
                      lambda g, n: torch.randn((n, *rest), generator=g, device=device, dtype=dtype))


def generator_device(generator: Generators) -> torch.device:
    return (generator if isinstance(generator, torch.Generator) else generator[0]).device
