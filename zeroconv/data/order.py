"""Data order that can be resumed exactly: epoch e visits a permutation seeded by (seed, e).

Each process takes its own slice of that permutation (rank, rank+world, ...), and a resumed run starts the
epoch's iterator at the batch where the checkpoint was taken: no sample repeated or skipped.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, num_samples: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.epoch, self.start = num_samples, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        per_rank = -(-self.num_samples // self.world_size)
        order += order[: per_rank * self.world_size - len(order)]  # pad so every rank gets the same count
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return len(self.indices()) - self.start


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    per_rank = -(-num_samples // world_size)
    return -(-per_rank // batch_size)


def epoch_batches(dataset, state, *, batch_size: int, seed: int, num_workers: int, collate_fn, rank: int = 0,
                  world_size: int = 1, pin_memory: bool = False):
    """Yield batches forever, epoch after epoch, keeping `state.epoch` / `state.batches_in_epoch` current.

    `state` is the TrainerState: a resumed run continues from the position saved in it."""
    while True:
        dataset.set_epoch(state.epoch)
        sampler = EpochSampler(len(dataset), seed, state.epoch, state.batches_in_epoch * batch_size, rank, world_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            collate_fn=collate_fn, pin_memory=pin_memory, drop_last=False,
                            persistent_workers=False)
        for batch in loader:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0
