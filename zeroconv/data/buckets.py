"""Aspect-ratio buckets (--aspect_buckets): which bucket each training image goes to.

An image goes to the bucket whose aspect ratio is nearest its own in log ratio (so 2:1 and 1:2 are equally far
from 1:1). Its size comes from the file's header alone (`Image.open().size` and the EXIF orientation, no pixel
decode): one pass over the dataset when the run starts, kept in memory for the run. The batches of one bucket are
formed by zeroconv.data.order.BucketBatchSampler; the resize and crop to the bucket by zeroconv.data.transforms.
"""

from __future__ import annotations

import io
import logging
import math
import os

from PIL import Image

from zeroconv.data.sources import Examples, ImageSource, source_label
from zeroconv.data.transforms import upright_size

logger = logging.getLogger("zeroconv.data")


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket (width, height) nearest in log aspect ratio to `size` (width, height); the first of
    equally near ones."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - ratio))


def header_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) of an image source, upright, read from its header (no decode)."""
    if isinstance(source, Image.Image):
        return upright_size(source)
    if isinstance(source, dict):  # a `datasets` image value
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"not an image: {type(source).__name__}")
    with Image.open(source) as image:
        return upright_size(image)


def assign_buckets(examples: Examples, buckets: list[tuple[int, int]], progress: bool = True) -> list[int]:
    """The bucket of every example, in one header pass (a progress bar from 1000 images). An image whose header
    cannot be read goes to the bucket nearest square: loading it fails later and the dataset replaces it by a
    readable sample, fitted to the same bucket, so the batch keeps its shape."""
    from tqdm.auto import tqdm

    from zeroconv.data.dataset import DATA_ERRORS

    square = nearest_bucket((1, 1), buckets)
    assigned = []
    for example in tqdm(examples, desc="aspect buckets", unit="img", disable=not progress or len(examples) < 1000):
        try:
            assigned.append(nearest_bucket(header_size(example.image), buckets))
        except DATA_ERRORS as exc:
            logger.debug("aspect buckets: %s unreadable (%s)", source_label(example.image) or example.name, exc)
            assigned.append(square)
    counts = {buckets[b]: assigned.count(b) for b in sorted(set(assigned))}
    logger.info("aspect buckets: %s", ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts.items()))
    return assigned
