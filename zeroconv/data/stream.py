"""Training from shards without random access: an IterableDataset that resumes.

A shard is a webdataset tar (zeroconv.data.shards.ShardIndex, `--train_data_dir`) or one parquet file of a
`datasets` dataset (zeroconv.data.datafiles.DataFileIndex, `--dataset_name X --streaming`); both list their
shards with known sample counts and read one shard's raw samples in order, and everything below is the same for
both.

Order of epoch e, a function of (seed, e, world size, loader workers, --shuffle_buffer) only:
- The shards are permuted by the (seed, e) generator (zeroconv.data.order.epoch_generator, which orders a folder
  layout's samples). Rank r takes every world_size-th shard of that order from the r-th, and its loader worker w
  every W-th of those from the w-th (W = max(1, --dataloader_num_workers)): each (rank, worker) reads its own
  shards, disjoint from all the others'. So every sample belongs to exactly one stream per epoch.
- A stream reads its shards in that order, one sample after another, through a shuffle buffer of
  --shuffle_buffer samples (raw bytes, decoded only when they leave it): when full, each new sample takes the
  place of one drawn at random, which leaves; the rest leave in a random order at the end. Its draws come from a
  generator of (seed, e, rank, worker): the same on a rerun.
- Every stream yields the same number of full batches, B x T samples (T: the largest number of batches any
  stream's shards can fill, a function of the shard counts only, so every epoch and rank has the same step count,
  as DDP needs): a stream with fewer samples starts its order again from the beginning to fill up. Those padded
  samples are the only ones seen twice in an epoch; with equal shards and shards x samples divisible by
  world_size x W x batch size there are none. The DataLoader takes one batch from each worker in turn.
- A sample's index, which seeds its flip, crop, caption and condition draws (zeroconv.data.dataset) and its
  noise and timestep (zeroconv.models.draws), is its global index in the shard set (shards.json; a parquet row's
  position across the ordered file list): the same whichever stream reads it.

Resume: a checkpoint holds the epoch and the batches each rank has consumed in it (TrainerState), the same count
on every rank, and the stream layout (`layout()`: shard set, world size, workers, batch size, buffer), which a
resume in mid-epoch must match. Because the shuffle buffer is a fixed function of positions, the samples of
those batches are known without reading anything: worker w consumed the batches w, w + W, ... before the
checkpoint's position. A shard is *consumed* when every one of its samples was in one of those batches; a
resumed stream never opens a consumed shard again in that epoch. A partially consumed shard (its samples were
still unread, or read and waiting in the shuffle buffer, when the checkpoint was taken) is read again up to its
last needed sample, and its samples already trained on are passed over undecoded; so the buffer's leftovers are
neither lost nor repeated, and a resumed run takes exactly the batches, in the order, of an uninterrupted one.

An unreadable sample is replaced by the stream's previous readable one (or, at a stream's start, the next),
counted in the batch's "skipped"; --strict_data raises instead.

With the latent cache, zeroconv.data.cache.CachedStream is this class with `produce` reading each position's
sample from the cache by its global index: all of the above holds unchanged, and no shard is opened.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from zeroconv.data.dataset import BadSample, ControlNetDataset, describe, epoch_rng, strict_error
from zeroconv.data.order import epoch_generator
from zeroconv.data.shards import Shard, ShardIndex
from zeroconv.data.sources import Example
from zeroconv.errors import UserError

if TYPE_CHECKING:
    from zeroconv.data.datafiles import DataFileIndex

logger = logging.getLogger("zeroconv.data")


def read_shard(index: ShardIndex | DataFileIndex, shard: Shard) -> Iterator[dict]:
    """The raw samples of one shard of `index`, in order: the one place a stream opens a shard."""
    return index.read(shard)


def shuffle_order(count: int, buffer: int, rng: np.random.Generator) -> list[int]:
    """The order in which a shuffle buffer of `buffer` samples lets positions 0..count-1 of a stream out."""
    if buffer <= 1:
        return list(range(count))
    draws = rng.integers(0, buffer, size=count)
    held, order = [], []
    for position in range(count):
        if len(held) < buffer:
            held.append(position)
            continue
        slot = int(draws[position])
        order.append(held[slot])
        held[slot] = position
    return order + [held[k] for k in rng.permutation(len(held))]


class StreamDataset(torch.utils.data.IterableDataset):
    """The training items of a shard set for one rank, `batch_size` x `batches_per_worker` per loader worker per
    epoch; `set_position(epoch, batches)` before each DataLoader (zeroconv.data.order.epoch_batches)."""

    def __init__(self, index: ShardIndex | DataFileIndex, samples: ControlNetDataset, *, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int):
        if samples.buckets or samples.union_weights:
            raise UserError("--aspect_buckets and --conditioning_image_columns need every sample up front; train "
                            "them from a folder layout, not from webdataset shards")
        self.index, self.samples = index, samples
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        self.workers, self.shuffle_buffer = max(1, num_workers), shuffle_buffer
        streams = world_size * self.workers
        if len(index.shards) < streams:
            raise UserError(f"{index.where}: {len(index.shards)} {index.unit} for {world_size} processes x "
                            f"{self.workers} loader workers; each needs one of its own: lower "
                            f"--dataloader_num_workers, or {index.more_shards}")
        # the most samples one stream's shards can hold, whichever shards the permutation gives it
        largest = sorted((shard.samples for shard in index.shards), reverse=True)[: -(-len(index.shards) // streams)]
        self.batches_per_worker = -(-sum(largest) // batch_size)
        self.epoch = self.start = 0

    def batches_per_epoch(self) -> int:
        return self.batches_per_worker * self.workers

    def __len__(self) -> int:
        """Samples this rank yields per epoch (so the DataLoader's length is batches_per_epoch)."""
        return self.batches_per_epoch() * self.batch_size

    def layout(self) -> dict:
        """What the position of a checkpoint means: a resume in mid-epoch needs the same."""
        return {"shards": self.index.fingerprint(), "world_size": self.world_size, "workers": self.workers,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer}

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batches: int) -> None:
        """Start at batch `batches` of this rank's epoch `epoch` (the DataLoader's workers get a copy)."""
        self.epoch, self.start = epoch, batches
        self.samples.set_epoch(epoch)

    def stream_shards(self, epoch: int, rank: int, worker: int) -> list[Shard]:
        order = torch.randperm(len(self.index.shards), generator=epoch_generator(self.seed, epoch)).tolist()
        return [self.index.shards[k] for k in order[rank::self.world_size][worker::self.workers]]

    def stream_order(self, epoch: int, rank: int, worker: int, shards: list[Shard]) -> list[int]:
        """The stream's positions (offsets into its shards' samples, end to end) in the order it yields them, one
        epoch's B x T: the shuffle buffer's order, then that order again from the start to fill up."""
        count = sum(shard.samples for shard in shards)
        rng = epoch_rng(self.seed, epoch, rank, worker, 3)
        order = shuffle_order(count, self.shuffle_buffer, rng)
        total = self.batches_per_worker * self.batch_size
        return (order * -(-total // count))[:total]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        loader_worker = info.id if info is not None else 0
        # the DataLoader starts at its worker 0; the batch due next is the (start % W)-th worker's
        worker = (loader_worker + self.start) % self.workers
        consumed = max(0, -(-(self.start - worker) // self.workers)) * self.batch_size
        shards = self.stream_shards(self.epoch, self.rank, worker)
        order = self.stream_order(self.epoch, self.rank, worker, shards)
        return self.items(shards, order, consumed)

    def items(self, shards: list[Shard], order: list[int], consumed: int) -> Iterator[dict]:
        starts = np.cumsum([0] + [shard.samples for shard in shards]).tolist()
        count = starts[-1]
        previous, owed = None, 0
        # one pass per round of the order (the fill-up repeats it), each reading the shards once, in order
        for begin in range(0, len(order), count):
            wanted = order[max(begin, consumed):begin + count]
            for item in self.produce(shards, starts, wanted):
                if isinstance(item, BadSample):
                    if self.samples.strict_data:
                        raise strict_error(item) from None
                    logger.warning("skipping unreadable sample %s (%s)", item.label, item.reason)
                    if previous is None:
                        owed += 1
                    else:
                        yield dict(previous, skipped=1)
                    continue
                item["skipped"] = 0
                yield item
                for _ in range(owed):
                    yield dict(item, skipped=1)
                previous, owed = item, 0
        if owed:
            raise UserError(f"none of the samples of shards {', '.join(s.name for s in shards)} could be read; "
                            "check them, or prepare them again")

    @staticmethod
    def global_index(shards: list[Shard], starts: list[int], position: int) -> tuple[Shard, int]:
        """The shard a stream position lies in, and the sample's global index."""
        number = bisect.bisect_right(starts, position) - 1
        return shards[number], shards[number].first_index + position - starts[number]

    def produce(self, shards: list[Shard], starts: list[int], wanted: list[int]) -> Iterator[dict | BadSample]:
        """The item (without "skipped") of each `wanted` position, in that order, or the BadSample it raised:
        read from the shards and transformed here; from the latent cache in zeroconv.data.cache.CachedStream."""
        for position, sample in self.read(shards, starts, wanted):
            shard, index = self.global_index(shards, starts, position)
            try:
                image, condition, caption = self.index.fields(sample)
                yield self.samples.item(Example(image, condition, caption, f"{shard.name} {index}"), index)
            except (BadSample, ValueError) as exc:
                yield exc if isinstance(exc, BadSample) else BadSample(f"{shard.name} {index}", describe(exc))

    def read(self, shards: list[Shard], starts: list[int], wanted: list[int]) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) for each of the `wanted` positions (distinct), in that order. Shards none of them
        lies in are not opened; a shard is read up to its last wanted sample. A sample waits in memory from its
        read until its turn: with the buffer's own order, at most --shuffle_buffer of them."""
        needed_in = Counter(bisect.bisect_right(starts, p) - 1 for p in wanted)
        wanted_set, waiting, turn = set(wanted), {}, 0
        for number, shard in enumerate(shards):
            if not needed_in[number]:
                continue
            samples = read_shard(self.index, shard)
            try:
                offset = -1
                for offset, sample in enumerate(samples):
                    position = starts[number] + offset
                    if offset >= shard.samples:
                        break
                    if position in wanted_set:
                        waiting[position] = sample
                        needed_in[number] -= 1
                    while turn < len(wanted) and wanted[turn] in waiting:
                        yield wanted[turn], waiting.pop(wanted[turn])
                        turn += 1
                    if not needed_in[number]:
                        break
                if offset + 1 != shard.samples and needed_in[number]:
                    raise self.index.wrong_count(shard, offset + 1)
            finally:
                close = getattr(samples, "close", None)
                if close is not None:
                    close()
