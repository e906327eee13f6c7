"""The latent cache of a streamed run (issue 16): built shard by shard from the data shards, read by global index in
the stream's own order, so a cached streamed run trains like the live one and never opens a data shard."""

import pickle

import torch

from tests.data.test_cache import assert_same_unet_inputs, unet_inputs
from tests.data.test_stream import break_image, opened, prepare_shards, shard_log, tiny_shards
from tests.train.helpers import controlnet_weights, fresh_setup, run_training, tiny_config, train_recording_batches
from zeroconv.data.cache import CachedStream
from zeroconv.train.cache import build_for_training

NAMES = [f"shard-{n:06d}.tar" for n in range(4)]


def stream_config(tiny_base, tmp_path, out, **overrides):
    """A streamed run of batch 4 (4 steps an epoch of 16); its data prepare_shards' 4 shards of 4 photos unless
    `overrides` name other data."""
    data = tmp_path / "shards"
    if "train_data_dir" not in overrides and not data.is_dir():
        prepare_shards(tmp_path, 16, 4)
    common = dict(train_batch_size=4, dataloader_num_workers=0, shuffle_buffer=6, random_flip=True,
                  proportion_empty_prompts=0.5, latent_cache_dir=str(tmp_path / "cache"), train_data_dir=str(data))
    return tiny_config(tiny_base, None, tmp_path / out, **dict(common, **overrides))


def indices(batches) -> list[list[int]]:
    return [batch["index"].tolist() for batch in batches]


def test_a_cached_streamed_run_feeds_the_unet_the_live_runs_inputs_without_opening_a_shard(
        tiny_base, tmp_path, monkeypatch):
    from zeroconv.data.stream import StreamDataset

    live, live_indices, _ = unet_inputs(stream_config(tiny_base, tmp_path, "live", max_train_steps=3))
    log = shard_log(monkeypatch, tmp_path)
    cache = build_for_training(stream_config(tiny_base, tmp_path, "build", cache="auto"))
    assert sorted(opened(log)) == NAMES  # the build read each data shard once, in order
    assert len(cache.manifest["sample_captions"]) == 16 and cache.shard_starts == [0, 4, 8, 12]
    log.unlink()
    cached, cached_indices, t = unet_inputs(stream_config(tiny_base, tmp_path, "cached", cache="auto",
                                                          max_train_steps=3))
    assert opened(log) == []  # served from the cache: no data shard opened
    assert isinstance(t.dataset, StreamDataset) and t.encoders.__class__.__name__ == "CachedEncoders"
    assert cached_indices == live_indices and len(cached) == len(live) == 6
    assert_same_unet_inputs(live, cached)


def test_a_cached_streamed_run_resumed_mid_epoch_ends_with_the_uninterrupted_runs_weights(tiny_base, tmp_path):
    straight = stream_config(tiny_base, tmp_path, "straight", cache="auto", max_train_steps=4, checkpointing_steps=2)
    reference = train_recording_batches(fresh_setup(straight))  # 4 steps = one epoch of 16
    stopped = stream_config(tiny_base, tmp_path, "stopped", cache="auto", max_train_steps=2, checkpointing_steps=2)
    train_recording_batches(fresh_setup(stopped))
    resumed = train_recording_batches(fresh_setup(stream_config(
        tiny_base, tmp_path, "stopped", cache="auto", max_train_steps=4, checkpointing_steps=2,
        resume_from_checkpoint="latest")))
    assert indices(resumed) == indices(reference[2:])
    a = controlnet_weights(tmp_path / "straight" / "checkpoint-4")
    b = controlnet_weights(tmp_path / "stopped" / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_streamed_cache_build_resumes_from_its_finished_shards(tiny_base, tmp_path, monkeypatch):
    import pytest

    from zeroconv.data import cache

    original, built = cache.encode_shard, []

    def dies_after_two(path, *args):
        if len(built) == 2:
            raise KeyboardInterrupt
        built.append(path.name)
        return original(path, *args)

    monkeypatch.setattr(cache, "encode_shard", dies_after_two)
    cfg = stream_config(tiny_base, tmp_path, "build", cache="auto")
    with pytest.raises(KeyboardInterrupt):
        build_for_training(cfg)
    monkeypatch.setattr(cache, "encode_shard", original)
    log = shard_log(monkeypatch, tmp_path)
    done = build_for_training(cfg)
    assert sorted(opened(log)) == NAMES[2:]  # the finished cache shards' data shards were not read again
    assert done.num_samples == 16 and len(done.manifest["sample_captions"]) == 16


def test_a_cached_streaming_parquet_run_trains_the_live_runs_weights_without_opening_a_file(
        tiny_base, tmp_path, monkeypatch):
    from tests.train.test_stream_train import photo_parquet

    source = dict(train_data_dir=None, dataset_name=str(photo_parquet(tmp_path, 16, 4)), streaming=True,
                  checkpointing_steps=4)
    live = train_recording_batches(fresh_setup(stream_config(tiny_base, tmp_path, "live", **source)))
    log = shard_log(monkeypatch, tmp_path)
    cache = build_for_training(stream_config(tiny_base, tmp_path, "build", cache="auto", **source))
    assert sorted(opened(log)) == [f"train-{n:05d}-of-00004.parquet" for n in range(4)]  # each file read once
    assert cache.shard_starts == [0, 4, 8, 12]
    log.unlink()
    cached = train_recording_batches(fresh_setup(stream_config(tiny_base, tmp_path, "cached", cache="auto",
                                                               **source)))
    assert opened(log) == [] and "latent_mean" in cached[0]  # served from the cache
    assert indices(cached) == indices(live) and sorted(sum(indices(live), [])) == list(range(16))
    a, b = (controlnet_weights(tmp_path / run / "checkpoint-4") for run in ("live", "cached"))
    assert a.keys() == b.keys()
    for key in a:  # the text encoder ran at other batch compositions: equal to float rounding
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    zero_convs = [w for k, w in b.items() if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))]
    assert zero_convs and all(w.abs().sum() > 0 for w in zero_convs)  # they start at zero: it trained


def test_an_unreadable_sample_is_recorded_by_the_cache_and_replaced_as_the_live_stream_replaces_it(
        tiny_base, tmp_path):
    data = tmp_path / "broken"
    tiny_shards(data, [4, 4, 4, 4])
    break_image(data / "shard-000001.tar", 5)
    source = dict(train_data_dir=str(data), max_train_steps=8)  # 2 epochs: two placements of the bad sample
    live = train_recording_batches(fresh_setup(stream_config(tiny_base, tmp_path, "live", **source)))
    cache = build_for_training(stream_config(tiny_base, tmp_path, "build", cache="auto", **source))
    assert cache.manifest["unreadable"] == [5] and cache.shard_starts == [0, 4, 8, 12]
    cached = train_recording_batches(fresh_setup(stream_config(tiny_base, tmp_path, "cached", cache="auto",
                                                               **source)))
    assert "latent_mean" in cached[0]
    assert indices(cached) == indices(live)  # the same replacement, at the same places
    assert [batch["skipped"] for batch in cached] == [batch["skipped"] for batch in live]
    assert sum(batch["skipped"] for batch in live) == 2 and 5 not in sum(indices(live), [])  # once an epoch


def test_a_cached_stream_on_two_loader_workers_takes_the_live_order_every_sample_once_an_epoch(
        tiny_base, tmp_path, monkeypatch):
    two = dict(dataloader_num_workers=2, max_train_steps=8)  # 2 epochs of 4 steps, 2 shards a worker
    live = train_recording_batches(fresh_setup(stream_config(tiny_base, tmp_path, "live", **two)))
    assert run_training(stream_config(tiny_base, tmp_path, "build", cache="only", **two)) == 0  # built, no step
    assert not (tmp_path / "build" / "metrics.jsonl").exists()
    log = shard_log(monkeypatch, tmp_path)  # the workers fork from this process: they log too
    t = fresh_setup(stream_config(tiny_base, tmp_path, "cached", cache="auto", **two))
    assert isinstance(pickle.loads(pickle.dumps(t.dataset)), CachedStream)  # as a spawned loader worker gets it
    cached = train_recording_batches(t)
    assert opened(log) == [] and "latent_mean" in cached[0]
    assert indices(cached) == indices(live)
    for epoch in (indices(cached)[:4], indices(cached)[4:]):
        assert sorted(sum(epoch, [])) == list(range(16))
    assert indices(cached)[:4] != indices(cached)[4:]  # each epoch its own order



def test_zeroconv_cache_refuses_a_streamed_condition_run_naming_why_and_the_fix(tiny_base, tmp_path):
    import pytest

    from zeroconv.errors import UserError

    with pytest.raises(UserError, match=r"zeroconv cache --condition with --train_data_dir .*: --condition extracts "
                                        r".*streams such a run live.* or drop --condition"):
        build_for_training(stream_config(tiny_base, tmp_path, "build", cache="auto", condition="canny"))
