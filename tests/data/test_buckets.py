"""Aspect-ratio buckets (issue 13): the bucket list, the assignment by log aspect ratio from headers alone, and
the batch sampler (one bucket a batch, deterministic per (seed, epoch), split across ranks, resumable)."""

from collections import Counter

import pytest
from PIL import Image

from zeroconv.config import parse_aspect_buckets
from zeroconv.data.buckets import assign_buckets, header_size, nearest_bucket
from zeroconv.data.order import BucketBatchSampler, batches_per_epoch
from zeroconv.data.sources import Example
from zeroconv.errors import UserError


def test_default_buckets_scale_with_the_resolution_to_multiples_of_8():
    assert parse_aspect_buckets("default", 1024)[:3] == [(1024, 1024), (1152, 896), (896, 1152)]
    at_512 = parse_aspect_buckets("default", 512)
    assert at_512 == [(512, 512), (576, 448), (448, 576), (608, 416), (416, 608), (672, 384), (384, 672),
                      (768, 320), (320, 768)]
    at_64 = parse_aspect_buckets("default", 64)
    assert at_64[:5] == [(64, 64), (72, 56), (56, 72), (80, 56), (56, 80)]
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in at_512 + at_64)


def test_explicit_buckets_and_their_errors():
    assert parse_aspect_buckets("96x64, 64x96,64x64", 64) == [(96, 64), (64, 96), (64, 64)]
    with pytest.raises(UserError, match=r"--aspect_buckets 100x64: 100x64 .* multiple of 8.*try 96x64"):
        parse_aspect_buckets("100x64", 64)
    with pytest.raises(UserError, match=r"'64by64' is not WxH"):
        parse_aspect_buckets("64by64", 64)


def test_nearest_bucket_is_nearest_in_log_ratio():
    buckets = parse_aspect_buckets("default", 64)
    assert buckets[nearest_bucket((96, 64), buckets)] == (80, 56)  # 1.5: log distance .05 to 1.43, .15 to 1.29
    assert buckets[nearest_bucket((64, 96), buckets)] == (56, 80)
    assert buckets[nearest_bucket((640, 640), buckets)] == (64, 64)
    assert buckets[nearest_bucket((1000, 100), buckets)] == (96, 40)  # beyond the widest: the widest


def test_sizes_come_from_headers_upright_and_unreadable_files_go_square(tmp_path):
    Image.new("RGB", (96, 64)).save(tmp_path / "wide.png")
    turned = Image.new("RGB", (96, 64))
    exif = turned.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: upright it is 64 x 96
    turned.save(tmp_path / "turned.jpg", exif=exif)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert header_size(str(tmp_path / "turned.jpg")) == (64, 96)
    assert header_size({"bytes": (tmp_path / "wide.png").read_bytes(), "path": None}) == (96, 64)
    examples = [Example(str(tmp_path / name), None, "", name) for name in ("wide.png", "turned.jpg", "broken.png")]
    buckets = [(64, 64), (96, 64), (64, 96)]
    assert assign_buckets(examples, buckets) == [1, 2, 0]


BUCKET_OF = [0] * 7 + [1] * 5 + [2] * 2  # 14 samples in three buckets


def test_every_batch_is_one_bucket_and_every_sample_comes_once_or_as_fill():
    sampler = BucketBatchSampler(BUCKET_OF, batch_size=3, seed=1, epoch=0)
    batches = sampler.batches()
    assert len(batches) == batches_per_epoch(14, 3, 1, BUCKET_OF) == 3 + 2 + 1
    assert all(len(batch) == 3 and len({BUCKET_OF[i] for i in batch}) == 1 for batch in batches)
    seen = Counter(i for batch in batches for i in batch)
    assert set(seen) == set(range(14))  # nothing dropped: the last partial batch of a bucket is filled up
    assert sum(seen.values()) - 14 == 2 + 1 + 1  # fill: 7 -> 9, 5 -> 6, 2 -> 3


def test_order_is_deterministic_per_seed_and_epoch_and_shuffled():
    def order(seed, epoch):
        return BucketBatchSampler(BUCKET_OF, 3, seed, epoch).batches()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    bucket_sequences = {tuple(BUCKET_OF[b[0]] for b in order(1, e)) for e in range(6)}
    assert len(bucket_sequences) > 1  # the order of the batches is shuffled, not bucket after bucket


def test_ranks_split_each_global_batch_and_see_the_same_bucket():
    ranks = [BucketBatchSampler(BUCKET_OF, 2, 3, 0, rank=r, world_size=2).batches() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == batches_per_epoch(14, 2, 2, BUCKET_OF) == 2 + 2 + 1
    for a, b in zip(*ranks):
        assert {BUCKET_OF[i] for i in a + b} == {BUCKET_OF[a[0]]} and len(a) == len(b) == 2
    assert set(i for batches in ranks for batch in batches for i in batch) == set(range(14))


def test_a_started_sampler_continues_the_same_batches():
    whole = BucketBatchSampler(BUCKET_OF, 3, 5, 2).batches()
    rest = list(BucketBatchSampler(BUCKET_OF, 3, 5, 2, start=4))
    assert rest == whole[4:] and len(BucketBatchSampler(BUCKET_OF, 3, 5, 2, start=4)) == 2
