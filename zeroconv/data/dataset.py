"""The training Dataset: rows of `Examples` through a `PairedTransform`, with per-sample draws that resume exactly.

The flip of sample i in epoch e, which caption of a list it gets and where a random crop lies come from a
generator seeded by (seed, e, i): the same whatever the worker count, the batch order or where a run was resumed.
Each item carries its "size_and_crop" (original height and width, crop top and left), SDXL's micro-conditioning.
With aspect buckets (`buckets`, and `bucket_of` from zeroconv.data.buckets.assign_buckets) sample i is resized and
cropped to its bucket's size instead of R x R; zeroconv.data.order.BucketBatchSampler batches one bucket at a time.

Bad data does not stop a run: an unreadable, truncated or empty file is replaced by the next readable index
(i+1, i+2, ... wrapping), so every batch keeps its shape; one log line names the file and the reason, and the
item's "skipped" counts the replacements (the loop sums them); a replacement is fitted to the bucket of the index
asked for, so a bucket's batch keeps its shape. `strict_data=True` raises instead.

A union ControlNet's dataset (`union_weights`: one weight per condition type) draws which types sample i is given
in epoch e from its own generator of (seed, e, i): the first type by the weights, each other one with probability
`union_extra_probability`. Only those conditions are read; the item's "conditioning_pixel_values" is [K, C, H, W]
(zeros where a type is not given, which the union ControlNet never reads) and "control_types" [K] bool.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from typing import Callable

import numpy as np
import torch
from PIL import Image

from zeroconv.data.conditions import BadInput
from zeroconv.data.sources import Example, Examples, open_image, source_label
from zeroconv.data.transforms import Crop, PairedTransform, upright_size
from zeroconv.errors import UserError

logger = logging.getLogger("zeroconv.data")

# What a broken image file raises in PIL (and in datasets' decoder): not a bug of ours, a sample to skip.
DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, struct.error, zlib.error)


def epoch_rng(seed: int, epoch: int, *keys: int) -> np.random.Generator:
    """The generator of one kind of random choice in one epoch: a sample's (keys: index, and a number per kind of
    draw) or a stream's shuffle buffer (zeroconv.data.stream). Its own stream per key, so no draw depends on the
    worker count, the rank or any other draw."""
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, *keys])


class BadSample(Exception):
    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.label, self.reason = label, reason


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class ControlNetDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Examples, transform: PairedTransform, seed: int = 0, random_flip: bool = False,
                 strict_data: bool = False, condition_fn: Callable[[Image.Image], Image.Image] | None = None,
                 buckets: list[tuple[int, int]] | None = None, bucket_of: list[int] | None = None,
                 union_weights: list[float] | None = None, union_extra_probability: float = 0.0):
        self.examples, self.transform = examples, transform
        # (width, height) of each bucket, and each sample's bucket; None: every sample R x R
        self.buckets, self.bucket_of = buckets, bucket_of
        self.seed, self.random_flip, self.strict_data = seed, random_flip, strict_data
        self.condition_fn = condition_fn
        self.union_weights, self.union_extra_probability = union_weights, union_extra_probability
        self.epoch = 0
        self.reported: set[int] = set()  # bad indices already logged by this process
        if condition_fn is None and not union_weights and len(examples) and examples[0].conditioning_image is None:
            raise UserError("the dataset has no conditioning images; compute them with --condition")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def draws(self, index: int) -> tuple[bool, float, tuple[float, float]]:
        """(flip, caption draw in [0, 1), crop draws (rows, columns) in [0, 1)) of sample `index` in the current
        epoch. The crop draws come after the first two, which stay what they were before there was a crop."""
        rng = epoch_rng(self.seed, self.epoch, index)
        flip_draw, caption_draw, crop_rows, crop_columns = rng.random(4)
        crop_draw = (float(crop_rows), float(crop_columns))
        return bool(self.random_flip and flip_draw < 0.5), float(caption_draw), crop_draw

    def union_draw(self, index: int) -> np.ndarray:
        """Which condition types sample `index` is given in the current epoch, [K] bool: the first drawn by
        `union_weights`, each other with probability `union_extra_probability`, so type k is given with
        probability w_k + (1 - w_k) p. From a generator of its own (seed, epoch, index, 2): the flip, caption and
        crop draws stay what they are in a plain run."""
        rng = epoch_rng(self.seed, self.epoch, index, 2)
        weights = np.asarray(self.union_weights, dtype=np.float64)
        first = rng.choice(len(weights), p=weights / weights.sum())
        given = rng.random(len(weights)) < self.union_extra_probability
        given[first] = True
        return given

    def __getitem__(self, index: int) -> dict:
        draws = self.draws(index)
        given = self.union_draw(index) if self.union_weights else None  # a union dataset: the types it is given
        target = self.buckets[self.bucket_of[index]] if self.buckets else None
        first_failure = None
        for skipped in range(len(self)):
            j = (index + skipped) % len(self)
            try:
                item = self.build(self.examples[j], j, draws, given, target)
            except BadSample as bad:
                if self.strict_data:
                    raise strict_error(bad) from None
                if j not in self.reported:
                    self.reported.add(j)
                    logger.warning("skipping unreadable sample %s (%s)", bad.label, bad.reason)
                first_failure = first_failure or bad
                continue
            item["skipped"] = skipped
            return item
        raise UserError(f"none of the {len(self)} training samples could be read (first: {first_failure}); "
                        "check the dataset's image files")

    def item(self, example: Example, index: int) -> dict:
        """The training item of `example` as sample `index` of the current epoch (its draws, its "index"), for a
        source without random access (zeroconv.data.stream); BadSample if it cannot be read."""
        given = self.union_draw(index) if self.union_weights else None
        return self.build(example, index, self.draws(index), given, None)

    def build(self, example: Example, index: int, draws: tuple[bool, float, tuple[float, float]],
              given: np.ndarray | None, target: tuple[int, int] | None) -> dict:
        """The item of `example` read as sample `index` with the `draws` (of the index asked for: a replacement
        keeps them), without "skipped"; BadSample if it cannot be read."""
        flip, caption_draw, crop_draw = draws
        if given is None:
            pixel_values, conditioning_pixel_values, crop = self.load(example, flip, index, crop_draw, target)
        else:
            pixel_values, conditioning_pixel_values, crop = self.load_union(example, flip, given, crop_draw, target)
        item = {"pixel_values": pixel_values, "conditioning_pixel_values": conditioning_pixel_values,
                "size_and_crop": torch.tensor(crop.size_and_crop(flip)),
                "caption": pick_caption(example.caption, caption_draw), "index": index}
        if given is not None:
            item["control_types"] = torch.from_numpy(given)
        return item

    def load(self, example: Example, flip: bool, index: int, crop_draw: tuple[float, float] = (0.5, 0.5),
             target: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, Crop]:
        """(image in [-1, 1], condition in [0, 1], where the crop lies); `target` (width, height): the size to
        fit to, R x R when None."""
        try:
            image = example.open_image()
        except DATA_ERRORS as exc:
            raise BadSample(source_label(example.image) or f"{example.name} image", describe(exc)) from exc
        crop = self.transform.crop(upright_size(image), crop_draw, target)
        if self.condition_fn is not None:
            image = self.transform.fit_image(image, crop.centering, crop.target)
            # the extractor's random choices (thresholds, stroke widths) are drawn per (seed, epoch, sample) like
            # the flip, so they too survive resume and do not depend on the worker count
            rng = epoch_rng(self.seed, self.epoch, index, 1)
            path = example.image if isinstance(example.image, (str, os.PathLike)) else None
            try:
                condition = self.condition_fn(image, rng=rng, path=path)
            except DATA_ERRORS + (BadInput,) as exc:
                raise BadSample(example.name, f"condition: {describe(exc)}") from exc
        else:
            try:
                condition = example.open_conditioning_image()
            except DATA_ERRORS as exc:
                label = source_label(example.conditioning_image) or f"{example.name} conditioning image"
                raise BadSample(label, describe(exc)) from exc
        try:
            return (*self.transform(image, condition, flip, crop.centering, crop.target), crop)
        except DATA_ERRORS as exc:  # modes PIL cannot convert, images too small to crop
            raise BadSample(example.name, describe(exc)) from exc

    def load_union(self, example: Example, flip: bool, given: np.ndarray, crop_draw: tuple[float, float],
                   target: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, Crop]:
        """(image in [-1, 1], the given conditions [K, C, H, W] in [0, 1], where the crop lies)."""
        try:
            image = example.open_image()
        except DATA_ERRORS as exc:
            raise BadSample(source_label(example.image) or f"{example.name} image", describe(exc)) from exc
        crop = self.transform.crop(upright_size(image), crop_draw, target)
        try:
            pixel_values = self.transform.image_tensor(image, flip, crop.centering, crop.target)
        except DATA_ERRORS as exc:
            raise BadSample(example.name, describe(exc)) from exc
        channels = self.transform.conditioning_channels
        conditions = torch.zeros(len(given), channels, *pixel_values.shape[-2:])
        for k in np.flatnonzero(given):
            source = example.conditioning_images[k]
            try:
                conditions[k] = self.transform.condition_tensor(open_image(source), flip, crop.centering, crop.target)
            except DATA_ERRORS as exc:
                label = source_label(source) or f"{example.name} conditioning image {k}"
                raise BadSample(label, describe(exc)) from exc
        return pixel_values, conditions, crop


def strict_error(bad: BadSample) -> UserError:
    return UserError(f"unreadable training sample {bad.label} ({bad.reason}); fix or remove it, or drop "
                     "--strict_data to skip such samples")


def pick_caption(caption: str | list[str], draw: float) -> str:
    if isinstance(caption, str):
        return caption
    return caption[int(draw * len(caption))] if caption else ""


def collate(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "conditioning_pixel_values": torch.stack([item["conditioning_pixel_values"] for item in batch]),
        "size_and_crop": torch.stack([item["size_and_crop"] for item in batch]),
        "caption": [item["caption"] for item in batch],
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
        "skipped": sum(item["skipped"] for item in batch),
        **({"control_types": torch.stack([item["control_types"] for item in batch])}
           if "control_types" in batch[0] else {}),
    }


def micro_conditioning(batch: dict, crop_top_left: tuple[int | None, int | None] = (None, None)) -> torch.Tensor:
    """Per sample (original h, w, crop top, left, target h, target w) as float32 [N, 6]: SDXL's add_time_ids
    (families that do not read it ignore it). The target is the condition's size: the training resolution, or the batch's aspect bucket.
    `crop_top_left` (--crops_coords_top_left_h/_w) replaces the crop the data had, where given."""
    size_and_crop = batch["size_and_crop"].to(torch.float32).clone()
    for column, fixed in zip((2, 3), crop_top_left):
        if fixed is not None:
            size_and_crop[:, column] = fixed
    target = torch.tensor(batch["conditioning_pixel_values"].shape[-2:], dtype=torch.float32)
    return torch.cat([size_and_crop, target.expand(len(size_and_crop), 2)], dim=1)
