"""Data order that can be resumed exactly: epoch e visits a permutation seeded by (seed, e).

Each process takes its own slice of that permutation (rank, rank+world, ...), and a resumed run starts the
epoch's iterator at the batch where the checkpoint was taken: no sample repeated or skipped.

With aspect buckets (--aspect_buckets) a batch holds one bucket: `BucketBatchSampler` shuffles each bucket, cuts it
into batches, and shuffles the order of all the batches, every draw from the same (seed, epoch) generator, so a
resumed run finds the same batches and starts at the saved one.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch `epoch`'s order (of samples, of buckets' batches, of streamed shards)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class EpochSampler(Sampler[int]):
    def __init__(self, num_samples: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.epoch, self.start = num_samples, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def indices(self) -> list[int]:
        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        per_rank = -(-self.num_samples // self.world_size)
        order += order[: per_rank * self.world_size - len(order)]  # pad so every rank gets the same count
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return len(self.indices()) - self.start


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of one bucket each. Epoch e: each bucket's samples in a permutation of the (seed, e) generator,
    in bucket order, cut into global batches of batch_size x world_size; then the order of all the batches is
    permuted by the same generator. Rank r takes the r-th batch_size slice of each global batch, so all ranks see
    the same bucket at every step. The last partial batch of a bucket is kept, filled up with the bucket's own
    first samples of the epoch (cyclically), so every batch has batch_size samples and a bucket smaller than a
    batch still trains; a filled-in sample is seen twice that epoch. `start` skips this rank's first batches."""

    def __init__(self, bucket_of: list[int], batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.bucket_of, self.batch_size, self.seed, self.epoch = bucket_of, batch_size, seed, epoch
        self.start, self.rank, self.world_size = start, rank, world_size

    def global_batches(self) -> list[list[int]]:
        generator = epoch_generator(self.seed, self.epoch)
        size = self.batch_size * self.world_size
        batches = []
        for bucket in sorted(set(self.bucket_of)):
            members = [i for i, b in enumerate(self.bucket_of) if b == bucket]
            order = [members[k] for k in torch.randperm(len(members), generator=generator).tolist()]
            padded = order + [order[k % len(order)] for k in range(-len(order) % size)]
            batches += [padded[k:k + size] for k in range(0, len(padded), size)]
        return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]

    def batches(self) -> list[list[int]]:
        low = self.rank * self.batch_size
        return [batch[low:low + self.batch_size] for batch in self.global_batches()]

    def __iter__(self):
        return iter(self.batches()[self.start:])

    def __len__(self) -> int:
        return len(self.global_batches()) - self.start


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1,
                      bucket_of: list[int] | None = None) -> int:
    if bucket_of is not None:
        size = batch_size * world_size
        return sum(-(-bucket_of.count(b) // size) for b in set(bucket_of))
    per_rank = -(-num_samples // world_size)
    return -(-per_rank // batch_size)


def epoch_batches(dataset, state, *, batch_size: int, seed: int, num_workers: int, collate_fn, rank: int = 0,
                  world_size: int = 1, pin_memory: bool = False, bucket_of: list[int] | None = None):
    """Yield batches forever, epoch after epoch, keeping `state.epoch` / `state.batches_in_epoch` current.

    `state` is the TrainerState: a resumed run continues from the position saved in it. `bucket_of` (each
    sample's aspect bucket) makes every batch one bucket's (BucketBatchSampler). An IterableDataset
    (zeroconv.data.stream.StreamDataset) orders and splits itself across ranks; it is told the position."""
    while True:
        dataset.set_epoch(state.epoch)
        common = dict(num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory, persistent_workers=False)
        if isinstance(dataset, torch.utils.data.IterableDataset):
            dataset.set_position(state.epoch, state.batches_in_epoch)
            loader = DataLoader(dataset, batch_size=batch_size, **common)
        elif bucket_of is not None:
            batch_sampler = BucketBatchSampler(bucket_of, batch_size, seed, state.epoch, state.batches_in_epoch,
                                               rank, world_size)
            loader = DataLoader(dataset, batch_sampler=batch_sampler, **common)
        else:
            sampler = EpochSampler(len(dataset), seed, state.epoch, state.batches_in_epoch * batch_size, rank,
                                   world_size)
            loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **common)
        for batch in loader:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0
