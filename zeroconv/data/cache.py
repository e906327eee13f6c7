"""The latent cache: what the frozen VAE and text encoder make of the training data, computed once.

For a locked base these numbers are the same every epoch, so `zeroconv cache` (or `zeroconv train --cache auto`)
stores per sample the VAE posterior's mean and std (and those of the flipped image with --random_flip), the
condition at training resolution as uint8 (not with --condition: extractors draw new random choices every epoch,
so those conditions are still computed per step), its size and crop (SDXL's micro-conditioning), and per distinct
caption what the family's prompt encoder returns (a dict of tensors: SD's hidden states; SDXL's two encoders'
hidden states and pooled embedding), and the empty prompt's. Training then draws a fresh latent from (mean, std)
with the same generator calls as the live VAE path, and picks flips and captions with ControlNetDataset's
per-(seed, epoch, index) draws: a seeded run feeds the UNet the same noisy latents with or without the cache.

Two sources, one reader (cached_item, by a sample's index):
- A map-style dataset (ControlNetDataset) is cut into shards of about SHARD_BYTES, read by index; CachedDataset
  serves it, replacing an unreadable sample by the next readable one as the dataset does.
- A streamed one (zeroconv.data.stream.StreamDataset: webdataset shards, or --streaming parquet files) has no
  random access: each data shard is read once, in order, through the stream's own reading (read_shard), into one
  cache shard of its own, whose metadata holds its samples' captions; the manifest adds every data shard's first
  global index and each sample's caption. CachedStream then serves the stream in its own order (its epoch's shard
  split, shuffle buffer, fill-up, resume and replacement of unreadable samples unchanged), every item read from
  the cache by its global index, and never opens a data shard. A streamed run with --condition would need the
  images again every epoch, so it trains live (zeroconv.train.setup.cache_cannot_serve).

On disk: `<root>/<key>/` with safetensors shards (memory-mapped when read) and manifest.json, written last. The
key hashes the dataset's fingerprint (a stream's: its shard set's), the base (path, configs, weight files' sizes
and mtimes), resolution, condition channels and extractor, flip, dtype and the transform's version: change any
and a new cache is built beside the old one, never mixed with it. Several processes split the shards, then the
main one writes the manifest. An interrupted build keeps its finished shards in `<key>.partial/` and resumes from
them.

This module takes its inputs as explicit arguments; `zeroconv cache` (zeroconv.train.cache) builds them with the
functions `zeroconv train` builds its own with (zeroconv.train.setup), so `--config run.yaml` builds exactly the
cache that `zeroconv train --config run.yaml --cache auto` will use.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from zeroconv.data.dataset import BadSample, pick_caption
from zeroconv.data.shards import Shard
from zeroconv.data.stream import StreamDataset
from zeroconv.errors import UserError

logger = logging.getLogger("zeroconv.cache")

CACHE_FORMAT = 2  # 2: prompt encodings as a dict of named tensors, per-sample size_and_crop
# Bump when PairedTransform's geometry or conversions change: old caches then stop matching.
TRANSFORM_VERSION = "fit-bilinear-center-crop/flip-after-fit/image[-1,1]/condition-uint8/v1"
SHARD_BYTES = 256 * 2**20
# The frozen parts whose configs and files decide what the encoders make (the second text encoder: SDXL's and
# SD3's; the third, T5: SD3's).
BASE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zeroconv" / "latents"


# ----------------------------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------------------------

def file_stats(folder: Path) -> list:
    return [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(folder.rglob("*")) if p.is_file()]


def base_identity(location: str, revision: str | None, base, vae: str | None = None) -> dict:
    """What makes the frozen encoders' outputs: the base's location (a resolved path, or a hub id), its component
    configs and weight files; and those of `vae` (--pretrained_vae_model_name_or_path) when it replaces the base's."""
    path = Path(location)
    identity: dict = {"name": str(path.resolve()) if path.exists() else location, "revision": revision,
                      # the encodings' shapes: SD3's T5 length is a run option (--max_sequence_length)
                      "prompt_shape": base.family.prompt_shape(base)}
    if vae is not None:
        vae_path = Path(vae)
        identity["vae"] = str(vae_path.resolve()) if vae_path.exists() else vae
        if vae_path.is_dir():
            identity["vae_files"] = file_stats(vae_path)
    for part in BASE_PARTS:
        if getattr(base, part, None) is None:
            continue
        config = getattr(base, part).config  # a Deferred text encoder's too: its config file, as loading reads it
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        # the dtype it was loaded in is not the model's (transformers records it); the key has the run's dtype
        identity[f"{part}_config"] = {k: v for k, v in config.items()
                                      if not k.startswith("_") and k not in ("dtype", "torch_dtype")}
    if path.is_file():
        identity["files"] = [[path.name, path.stat().st_size, path.stat().st_mtime_ns]]
    elif path.is_dir():
        identity["files"] = {part: file_stats(path / part) for part in (*BASE_PARTS, "tokenizer", "tokenizer_2",
                                                                         "tokenizer_3")
                             if (path / part).is_dir()}
    return json.loads(json.dumps(identity, default=str))


def samples_of(dataset):
    """The ControlNetDataset that transforms and draws for `dataset` (itself, or a StreamDataset's)."""
    return dataset.samples if is_streamed(dataset) else dataset


def is_streamed(dataset) -> bool:
    """A StreamDataset: its samples are read shard by shard, never by index."""
    return isinstance(dataset, StreamDataset)


def num_samples(dataset) -> int:
    """The samples `dataset` holds: a map-style one's length; a stream's, its shards' listed counts summed (the
    StreamDataset's own length is what one rank yields per epoch, fill-up included)."""
    return sum(shard.samples for shard in dataset.index.shards) if is_streamed(dataset) else len(dataset)


def cache_identity(dataset, base: dict, tokenizer_name: str | None, condition: str | None,
                   weight_dtype: torch.dtype) -> dict:
    """The key's contents: `dataset` (a ControlNetDataset; or a StreamDataset, whose shard set's fingerprint
    stands for the examples) gives the examples, resolution, channels and flip; `base` is base_identity's."""
    streamed = is_streamed(dataset)
    fingerprint = {"shards": dataset.index.fingerprint()} if streamed else dataset.examples.fingerprint()
    dataset = samples_of(dataset)
    return {
        "format": CACHE_FORMAT,
        "dataset": fingerprint,
        "base": base,
        "tokenizer_name": tokenizer_name,
        "resolution": dataset.transform.resolution,
        "conditioning_channels": dataset.transform.conditioning_channels,
        "interpolation": dataset.transform.interpolation,
        "condition": condition,  # decides which samples are unreadable
        "random_flip": bool(dataset.random_flip),
        "dtype": str(weight_dtype),
        "transform": TRANSFORM_VERSION,
    }


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def condition_to_float(condition: torch.Tensor) -> torch.Tensor:
    """uint8 CHW -> float32 in [0, 1] with the same operations as transforms.to_tensor (bit-identical)."""
    return condition.to(torch.float32).mul_(1.0 / 255.0)


class LatentCache:
    """A complete cache folder, read through memory maps (each process, each loader worker opens its own)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.num_samples = self.manifest["num_samples"]
        self.samples_per_shard = self.manifest["samples_per_shard"]
        self.captions_per_shard = self.manifest["captions_per_shard"]
        self.flipped = self.manifest["flipped"]
        self.unreadable = set(self.manifest["unreadable"])
        self.caption_ids = {caption: i for i, caption in enumerate(self.manifest["captions"])}
        # a streamed source's cache: one cache shard per data shard (their first indices), captions per index
        self.shard_starts = self.manifest.get("shard_starts")
        self.sample_captions = self.manifest.get("sample_captions")
        self.handles: dict[str, object] = {}

    @classmethod
    def open(cls, folder: str | Path, identity: dict) -> LatentCache | None:
        """The cache in `folder` if it is complete and was built for exactly `identity`, else None."""
        manifest = Path(folder) / "manifest.json"
        if not manifest.is_file():
            return None
        cache = cls(folder)
        return cache if cache.manifest["identity"] == identity else None

    def __getstate__(self):  # loader workers reopen the memory maps
        return {**self.__dict__, "handles": {}}

    def tensor(self, file: str, name: str, row: int) -> torch.Tensor:
        from safetensors import safe_open

        handle = self.handles.get(file)
        if handle is None:
            handle = self.handles[file] = safe_open(str(self.folder / file), framework="pt")
        return handle.get_slice(name)[row:row + 1][0]

    def readable(self, index: int) -> bool:
        return index not in self.unreadable

    def sample(self, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(posterior mean, posterior std, condition uint8 or None when computed by --condition, size_and_crop) of
        sample `index`, flipped or not."""
        file, row = self.locate(index)
        suffix = "_flipped" if flip else ""
        condition = self.tensor(file, "condition", row) if self.manifest["conditions"] else None
        if condition is not None and flip:
            condition = condition.flip(-1)
        return (self.tensor(file, "mean" + suffix, row), self.tensor(file, "std" + suffix, row), condition,
                self.tensor(file, "size_and_crop" + suffix, row))

    def locate(self, index: int) -> tuple[str, int]:
        """(shard file, row) of sample `index`."""
        if self.shard_starts is None:
            number, row = divmod(index, self.samples_per_shard)
        else:
            number = bisect.bisect_right(self.shard_starts, index) - 1
            row = index - self.shard_starts[number]
        return f"shard-{number:05d}.safetensors", row

    def caption(self, index: int, source=None) -> str | list[str]:
        """Sample `index`'s caption (one, or a list to draw from): from the cache of a streamed source, else from
        the map-style `source`'s examples."""
        return self.sample_captions[index] if self.sample_captions is not None else source.examples[index].caption

    def prompts(self, caption: str) -> dict[str, torch.Tensor]:
        index = self.caption_ids[caption]
        file = f"captions-{index // self.captions_per_shard:05d}.safetensors"
        return {name: self.tensor(file, name, index % self.captions_per_shard) for name in self.manifest["prompts"]}

    @property
    def empty_prompts(self) -> dict[str, torch.Tensor]:
        """The empty prompt's encodings, [1, ...] each (what caption dropout puts in)."""
        return {name: self.tensor("empty.safetensors", name, 0)[None] for name in self.manifest["prompts"]}


def cached_item(cache: LatentCache, index: int, draws: tuple, caption: str | list[str],
                condition: torch.Tensor | None = None) -> dict:
    """The training item of sample `index` from the cache, with `draws` (ControlNetDataset.draws: the flip and
    caption draw this epoch gives it) and its `caption` (or list); `condition`: one extracted live
    (--condition), else the cached one. Without "skipped"."""
    flip, caption_draw, _ = draws
    mean, std, cached_condition, size_and_crop = cache.sample(index, flip)
    if condition is None:
        condition = condition_to_float(cached_condition)
    caption = pick_caption(caption, caption_draw)
    return {"latent_mean": mean, "latent_std": std, "conditioning_pixel_values": condition,
            "size_and_crop": size_and_crop, "prompts": cache.prompts(caption), "caption": caption, "index": index}


class CachedDataset(torch.utils.data.Dataset):
    """ControlNetDataset's items from the cache: same length, same per-(seed, epoch, index) flips and captions,
    same replacement of unreadable samples; latents as (mean, std) and caption embeddings instead of pixels."""

    def __init__(self, cache: LatentCache, source):
        if len(source) != cache.num_samples:
            raise ValueError(f"cache has {cache.num_samples} samples, dataset {len(source)}")
        self.cache, self.source = cache, source  # source: the ControlNetDataset, for its draws and captions

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __len__(self) -> int:
        return self.cache.num_samples

    def __getitem__(self, index: int) -> dict:
        draws = self.source.draws(index)  # a random crop is refused with a cache
        for skipped in range(len(self)):
            j = (index + skipped) % len(self)
            if not self.cache.readable(j):
                continue
            condition = None
            if not self.cache.manifest["conditions"]:  # --condition: extracted per (seed, epoch, sample) as live
                try:
                    condition = self.source.load(self.source.examples[j], draws[0], j)[1]
                except BadSample:
                    continue
            return dict(cached_item(self.cache, j, draws, self.cache.caption(j, self.source), condition),
                        skipped=skipped)
        raise UserError(f"none of the {len(self)} training samples could be read; check the dataset's image files")

    @staticmethod
    def collate(batch: list[dict]) -> dict:
        stacked = {key: torch.stack([item[key] for item in batch])
                   for key in ("latent_mean", "latent_std", "conditioning_pixel_values", "size_and_crop")}
        prompts = {name: torch.stack([item["prompts"][name] for item in batch]) for name in batch[0]["prompts"]}
        return {**stacked, "prompts": prompts, "caption": [item["caption"] for item in batch],
                "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
                "skipped": sum(item["skipped"] for item in batch)}


class CachedStream(StreamDataset):
    """`stream`'s batches (a StreamDataset's) in its own order, with the same positions, resume, fill-up and
    replacement of unreadable samples, each item cached_item of its global index: the data shards are never
    opened. A module-level class, so loader workers started by spawn can unpickle it."""

    def __init__(self, cache: LatentCache, stream: StreamDataset):
        if num_samples(stream) != cache.num_samples:  # the key holds the shard set: a broken cache, not a user's
            raise ValueError(f"{cache.folder}: {cache.num_samples} samples, the shards {num_samples(stream)}")
        if not cache.manifest["conditions"]:  # cache_cannot_serve keeps --condition's streamed runs live
            raise ValueError(f"{cache.folder}: no cached conditions, and a cached stream reads no image to extract "
                             "them from")
        self.__dict__.update(stream.__dict__)  # the stream's layout, position and draws, as build_stream made them
        self.cache = cache

    def produce(self, shards: list[Shard], starts: list[int], wanted: list[int]) -> Iterator[dict | BadSample]:
        for position in wanted:
            shard, index = self.global_index(shards, starts, position)
            if not self.cache.readable(index):
                yield BadSample(f"{shard.name} {index}", "unreadable when the latent cache was built")
                continue
            yield cached_item(self.cache, index, self.samples.draws(index), self.cache.caption(index))


def serve(cache: LatentCache, dataset):
    """(dataset, collate) that give `dataset`'s batches from `cache` (a ControlNetDataset's or a StreamDataset's)."""
    return (CachedStream(cache, dataset) if is_streamed(dataset) else CachedDataset(cache, dataset),
            CachedDataset.collate)


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------

class RawSamples(torch.utils.data.Dataset):
    """Sample i unflipped, as ControlNetDataset transforms it, or a note that it cannot be read."""

    def __init__(self, dataset, indices: range):
        self.dataset, self.indices = dataset, indices
        self.resolution = dataset.transform.resolution
        self.channels = dataset.transform.conditioning_channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        return raw_sample(self.dataset, self.dataset.examples[index], index)


def raw_sample(dataset, example, index: int, bad: tuple[str, str] | None = None) -> dict:
    """`example` as sample `index`, unflipped, as `dataset` (a ControlNetDataset) transforms it, or a note that it
    cannot be read (`bad`: already known so); with its caption (or list). What every cache shard is built from."""
    resolution, channels = dataset.transform.resolution, dataset.transform.conditioning_channels
    try:
        if bad is not None:
            raise BadSample(*bad)
        pixels, condition, crop = dataset.load(example, False, index)
        size_and_crop = [crop.size_and_crop(False), crop.size_and_crop(True)]
    except BadSample as exc:
        pixels = torch.zeros(3, resolution, resolution)
        condition, bad = torch.zeros(channels, resolution, resolution), (exc.label, exc.reason)
        size_and_crop = [(0, 0, 0, 0)] * 2
    return {"index": index, "pixels": pixels, "condition": condition.mul(255).round_().to(torch.uint8),
            "size_and_crop": torch.tensor(size_and_crop), "bad": bad,
            "caption": example.caption if example is not None else ""}


def streamed_raw(stream, shard, batch_size: int):
    """Batches (collate_raw's) of one data shard's samples, read in order through the stream's own shard reading
    (zeroconv.data.stream.read_shard and the index's fields): a streamed source is never read by index."""
    from zeroconv.data.dataset import describe
    from zeroconv.data.sources import Example
    from zeroconv.data.stream import read_shard  # looked up at each call: the one place a shard is opened

    index, batch, found = stream.index, [], 0
    samples = read_shard(index, shard)
    try:
        for offset, sample in enumerate(samples):
            if offset >= shard.samples:
                break
            found, number = offset + 1, shard.first_index + offset
            try:
                image, condition, caption = index.fields(sample)
                batch.append(raw_sample(stream.samples, Example(image, condition, caption, f"{shard.name} {number}"),
                                        number))
            except ValueError as exc:
                batch.append(raw_sample(stream.samples, None, number, (f"{shard.name} {number}", describe(exc))))
            if len(batch) == batch_size:
                yield collate_raw(batch)
                batch = []
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()
    if found != shard.samples:
        raise index.wrong_count(shard, found)
    if batch:
        yield collate_raw(batch)


def collate_raw(batch: list[dict]) -> dict:
    return {"index": [item["index"] for item in batch], "bad": [item["bad"] for item in batch],
            "caption": [item["caption"] for item in batch],
            "pixels": torch.stack([item["pixels"] for item in batch]),
            "condition": torch.stack([item["condition"] for item in batch]),
            "size_and_crop": torch.stack([item["size_and_crop"] for item in batch])}


@dataclass
class Encoders:
    """The frozen encoders as the cache runs them: on `device` in `dtype`, `batch_size` at a time.

    Build at the training batch size: CPU kernels split work by batch size, so only then are the cached numbers
    bit-identical to the live VAE's (on GPU they agree to rounding)."""

    vae: object  # in the dtype the family runs it in (SDXL's stays float32 under fp16)
    encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]]  # the base family's prompt encoder, on `device`
    prompt_shape: dict[str, tuple[int, ...]]  # of one caption's encodings, which sizes the caption shards
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    prompt_batch_size: int | None = None  # --dataset_preprocess_batch_size; None: batch_size

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for chunk in pixels.split(self.batch_size):
            dist = self.vae.encode(chunk.to(self.device, self.vae.dtype)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {}
        size = self.prompt_batch_size or self.batch_size
        for start in range(0, len(captions), size):
            for name, value in self.encode_prompts(captions[start:start + size]).items():
                out.setdefault(name, []).append(value.to(self.dtype).cpu())
        return {name: torch.cat(values) for name, values in out.items()}


def save_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def build_shard(path: Path, dataset, indices: range, encoders: Encoders, flipped: bool, strict_data: bool,
                num_workers: int, progress) -> list[int]:
    """Encode samples `indices` of a map-style `dataset` into one shard file; returns the unreadable ones."""
    loader = torch.utils.data.DataLoader(RawSamples(dataset, indices), batch_size=encoders.batch_size,
                                         num_workers=num_workers, collate_fn=collate_raw)
    return encode_shard(path, loader, dataset, encoders, flipped, strict_data, progress)


def encode_shard(path: Path, batches, dataset, encoders: Encoders, flipped: bool, strict_data: bool,
                 progress) -> list[int]:
    """Encode the raw `batches` (collate_raw's, of a map-style or a streamed source) into one shard file, with the
    samples' captions in its metadata; returns the unreadable ones."""
    parts: dict[str, list] = {}
    unreadable, captions = [], []
    for batch in batches:
        captions += batch["caption"]
        for index, bad in zip(batch["index"], batch["bad"]):
            if bad is None:
                continue
            if strict_data:
                raise UserError(f"unreadable training sample {bad[0]} ({bad[1]}); fix or remove it, or drop "
                                "--strict_data to skip such samples")
            logger.warning("skipping unreadable sample %s (%s)", *bad)
            unreadable.append(index)
        mean, std = encoders.posterior(batch["pixels"])
        parts.setdefault("mean", []).append(mean)
        parts.setdefault("std", []).append(std)
        if flipped:
            mean, std = encoders.posterior(batch["pixels"].flip(-1))
            parts.setdefault("mean_flipped", []).append(mean)
            parts.setdefault("std_flipped", []).append(std)
        if dataset.condition_fn is None:  # an extractor's random choices change every epoch: not cached
            parts.setdefault("condition", []).append(batch["condition"])
        parts.setdefault("size_and_crop", []).append(batch["size_and_crop"][:, 0])
        parts.setdefault("size_and_crop_flipped", []).append(batch["size_and_crop"][:, 1])
        progress.update(len(batch["index"]))
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors["unreadable"] = torch.tensor(unreadable + [-1], dtype=torch.long)  # -1: safetensors has no empty
    save_atomic(tensors, path, {"captions": json.dumps(captions)})
    return unreadable


def shard_size(dataset, flipped: bool, batch_size: int, latent_bytes: int) -> int:
    """Samples per shard: about SHARD_BYTES a file, a multiple of the batch size (the VAE batches stay whole)."""
    r = dataset.transform.resolution
    per_sample = r * r * dataset.transform.conditioning_channels + latent_bytes * (4 if flipped else 2)
    return max(1, SHARD_BYTES // per_sample // batch_size) * batch_size


def build_cache(folder: str | Path, identity: dict, dataset, encoders: Encoders, *, flipped: bool,
                strict_data: bool = False, num_workers: int = 0) -> LatentCache:
    """Encode `dataset` into `folder`. Every process of the run calls this: each builds its share of the shards,
    then the main process encodes the captions and writes the manifest. A ControlNetDataset is cut into shards of
    about SHARD_BYTES; a StreamDataset gives one cache shard per data shard, each read in order (never by index),
    and its per-index captions go into the manifest."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    stream = dataset if is_streamed(dataset) else None
    dataset = samples_of(dataset)
    n = num_samples(stream or dataset)
    r = dataset.transform.resolution
    latent_channels = encoders.vae.config.latent_channels
    scale = 2 ** (len(encoders.vae.config.block_out_channels) - 1)
    latent_bytes = latent_channels * (r // scale) ** 2 * torch.finfo(encoders.vae.dtype).bits // 8
    per_shard = shard_size(dataset, flipped, encoders.batch_size, latent_bytes)
    shards = ([range(s.first_index, s.first_index + s.samples) for s in stream.index.shards] if stream else
              [range(start, min(start + per_shard, n)) for start in range(0, n, per_shard)])
    mine = [s for s in range(len(shards)) if s % state.num_processes == state.process_index]
    todo = [s for s in mine if not (partial / f"shard-{s:05d}.safetensors").is_file()]
    with tqdm(total=sum(len(shards[s]) for s in todo), desc="cache latents", unit="img",
              disable=not state.is_local_main_process, dynamic_ncols=True) as progress:
        for s in todo:
            path = partial / f"shard-{s:05d}.safetensors"
            if stream is None:
                build_shard(path, dataset, shards[s], encoders, flipped, strict_data, num_workers, progress)
            else:
                encode_shard(path, streamed_raw(stream, stream.index.shards[s], encoders.batch_size), dataset,
                             encoders, flipped, strict_data, progress)
    state.wait_for_everyone()
    if state.is_main_process:
        unreadable, sample_captions = [], []
        from safetensors import safe_open

        for s in range(len(shards)):
            with safe_open(str(partial / f"shard-{s:05d}.safetensors"), framework="pt") as handle:
                unreadable += [i for i in handle.get_tensor("unreadable").tolist() if i >= 0]
                if stream is not None:
                    sample_captions += json.loads(handle.metadata()["captions"])
        write_captions(partial, sample_captions if stream is not None else
                       [dataset.examples[i].caption for i in range(len(dataset.examples))], encoders)
        captions = json.loads((partial / "captions.json").read_text())
        manifest = {"identity": identity, "key": cache_key(identity), "num_samples": n, "samples_per_shard": per_shard,
                    "captions_per_shard": captions["per_shard"], "captions": captions["captions"],
                    "prompts": captions["prompts"],
                    "flipped": flipped, "conditions": dataset.condition_fn is None, "unreadable": sorted(unreadable), "dtype": str(encoders.dtype)}
        if stream is not None:
            manifest.update(shard_starts=[s.first_index for s in stream.index.shards], sample_captions=sample_captions)
        (partial / "manifest.json").write_text(json.dumps(manifest))
        if folder.exists():  # an incomplete or foreign leftover under the same name
            shutil.rmtree(folder)
        os.replace(partial, folder)
    state.wait_for_everyone()
    return LatentCache(folder)


def write_captions(folder: Path, sample_captions: list, encoders: Encoders) -> None:
    """Every distinct caption's encodings (first-seen order) and the empty prompt's, sharded; `sample_captions`:
    each sample's caption or list of captions, in index order."""
    captions = list(dict.fromkeys(c for caption in sample_captions for c in as_list(caption)))
    per_shard = max(1, SHARD_BYTES // (sum(math.prod(shape) for shape in encoders.prompt_shape.values()) * 4))
    for s, start in enumerate(range(0, len(captions), per_shard)):
        save_atomic(encoders.prompts(captions[start:start + per_shard]), folder / f"captions-{s:05d}.safetensors")
    save_atomic(encoders.prompts([""]), folder / "empty.safetensors")
    (folder / "captions.json").write_text(json.dumps({"per_shard": per_shard, "captions": captions,
                                                      "prompts": sorted(encoders.prompt_shape)}))


def as_list(caption: str | list[str]) -> list[str]:
    return [caption] if isinstance(caption, str) else (list(caption) or [""])


class CacheUnavailable(Exception):
    """The cache cannot be written here (no room, not writable); the message says why, in a few words."""


def estimated_bytes(dataset, encoders: Encoders, flipped: bool) -> int:
    """About what the cache of `dataset` takes on disk: every sample's latents and condition, every caption's
    encodings (at most one a sample)."""
    n = num_samples(dataset)
    dataset = samples_of(dataset)
    r = dataset.transform.resolution
    scale = 2 ** (len(encoders.vae.config.block_out_channels) - 1)
    latent_bytes = encoders.vae.config.latent_channels * (r // scale) ** 2 * torch.finfo(encoders.vae.dtype).bits // 8
    condition_bytes = r * r * dataset.transform.conditioning_channels if dataset.condition_fn is None else 0
    per_sample = condition_bytes + latent_bytes * (4 if flipped else 2)  # mean and std, and their mirror images
    per_caption = sum(math.prod(shape) for shape in encoders.prompt_shape.values()) * torch.finfo(encoders.dtype).bits // 8
    return n * (per_sample + per_caption)


def check_room(root: Path, needed: int) -> None:
    """Raise CacheUnavailable unless `root` can be written and its disk has `needed` bytes and a margin free."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheUnavailable(f"{root} is not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(root).free
    margin = max(needed // 10, 256 * 2**20)  # the run's checkpoints and logs need room too
    if free < needed + margin:
        raise CacheUnavailable(f"it needs about {needed / 2**20:,.0f} MiB and {root} has {free / 2**20:,.0f} MiB free")


def open_or_build(root: str | Path, identity: dict, dataset, encoders: Encoders, *, flipped: bool,
                  strict_data: bool = False, num_workers: int = 0) -> LatentCache:
    """The cache for `identity` under `root`: reused when complete, else built (all processes take part).
    CacheUnavailable when it cannot be built there (checked before the first write, and a write that fails
    midway leaves nothing behind)."""
    from safetensors import SafetensorError

    folder = Path(root) / cache_key(identity)
    cache = LatentCache.open(folder, identity)
    if cache is not None:
        logger.info("latent cache: reusing %s", folder)
        return cache
    needed = estimated_bytes(dataset, encoders, flipped)
    check_room(Path(root), needed)
    with build_lock(folder):
        cache = LatentCache.open(folder, identity)  # another run may have built it while this one waited
        if cache is not None:
            logger.info("latent cache: reusing %s, built meanwhile by another run", folder)
            return cache
        logger.info("latent cache: building %s (%d samples, about %s MiB)", folder, num_samples(dataset),
                    f"{needed / 2**20:,.1f}")
        try:
            return build_cache(folder, identity, dataset, encoders, flipped=flipped, strict_data=strict_data,
                               num_workers=num_workers)
        except (OSError, SafetensorError) as exc:  # the disk filled up, the folder went away: no half cache stays
            shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
            raise CacheUnavailable(f"writing it in {root} failed ({getattr(exc, 'strerror', None) or exc})") from None


@contextlib.contextmanager
def build_lock(folder: Path):
    """One run at a time builds a given cache: two runs started together on the same data (a sweep) would write
    the same shards into one .partial folder. The main process of a run holds an flock on .<key>.lock while the
    run's processes build; the other ranks wait for it at a barrier, so a run that waits for another's build
    waits whole. Released by the kernel if the process dies."""
    import fcntl

    from accelerate import PartialState

    state = PartialState()
    handle = None
    if state.is_main_process:
        # hidden, and left in place: deleting a lock file races with a run about to take it
        handle = open(folder.with_name(f".{folder.name}.lock"), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("latent cache: another run is building %s; waiting for it", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
    state.wait_for_everyone()
    try:
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
