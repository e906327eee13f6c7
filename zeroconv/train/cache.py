"""`zeroconv cache`: build (or find) the latent cache that `zeroconv train` with the same flags reads
(--cache auto, the default, or on).

The dataset, base and dtype come from zeroconv.train.setup, the functions training builds its own with: the two
commands cannot disagree about what the cache holds.
"""

from __future__ import annotations

import logging
import sys

from zeroconv.config import TrainConfig, parse
from zeroconv.data.cache import CacheUnavailable, LatentCache
from zeroconv.errors import EXIT_OK, UserError

logger = logging.getLogger("zeroconv.cache")


def build_for_training(cfg: TrainConfig) -> LatentCache:
    """Build (or find) the cache that `zeroconv train` with the same flags and --cache auto would use."""
    from zeroconv.data.sources import STREAMED_CONDITION, ShardExamples, load_examples
    from zeroconv.models.dtypes import weight_dtype
    from zeroconv.models.locate import check_base_arg
    from zeroconv.train.setup import (build_dataset, build_stream, latent_cache, load_frozen_base, make_accelerator,
                                      run_seed)

    check_base_arg(cfg.pretrained_model_name_or_path, revision=cfg.revision, cache_dir=cfg.cache_dir)
    for flag, value in (("random_crop", cfg.random_crop), ("aspect_buckets", cfg.aspect_buckets)):
        if value:  # `zeroconv train` with these encodes live (--cache auto) or refuses (--cache on)
            raise UserError(f"zeroconv cache --{flag}: a run with --{flag} cannot use a latent cache (it stores one "
                            f"square crop per image); train with --cache off, or drop --{flag}")
    examples = load_examples(cfg)
    accelerator = make_accelerator(cfg, tracking=False)
    seed = run_seed(cfg)
    streamed = isinstance(examples, ShardExamples)
    if streamed and cfg.condition:  # `zeroconv train --cache auto` streams these live
        raise UserError(f"zeroconv cache --condition with {examples.index.where}: {STREAMED_CONDITION}; `zeroconv "
                        "train` streams such a run live, with no cache to build, or drop --condition to cache the "
                        "shards' own conditioning images")
    # webdataset shards and --streaming: a cache shard per data shard, each read once in order as the stream reads it
    dataset = build_stream(cfg, examples, seed, accelerator) if streamed else build_dataset(cfg, examples, seed)
    dtype = weight_dtype(accelerator.mixed_precision)
    # loaded in the training dtype, as the encoders of `zeroconv train` hold it (a cast after loading makes
    # diffusers warn, and gives the same weights)
    base = load_frozen_base(cfg, dtype=dtype)
    try:
        return latent_cache(cfg, dataset, base, accelerator.device, dtype)
    except CacheUnavailable as why:
        raise UserError(f"the latent cache cannot be built: {why}; pass --latent_cache_dir on a disk with room") from None


def main(argv: list[str] | None = None) -> int:
    cfg = parse(TrainConfig, argv, prog="zeroconv cache",
                description="Precompute the VAE latents (mean and std), caption embeddings and conditions that "
                "`zeroconv train --cache auto` reads. Takes zeroconv train's flags; those that shape the cache are "
                "the base, the data flags, --resolution, --conditioning_channels, --condition, --random_flip, "
                "--mixed_precision, --train_batch_size and --latent_cache_dir.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cache = build_for_training(cfg)
    print(cache.folder)
    return EXIT_OK
