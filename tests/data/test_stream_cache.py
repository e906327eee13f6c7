"""The latent cache of a streamed run (issue 16): built shard by shard from the data shards, read by global index in
the stream's own order, so a cached streamed run trains like the live one and never opens a data shard."""

import torch

from tests.data.test_cache import unet_inputs
from tests.data.test_stream import opened, prepare_shards, shard_log
from tests.train.helpers import controlnet_weights, fresh_setup, tiny_config, train_recording_batches
from zeroconv.train.cache import build_for_training

NAMES = [f"shard-{n:06d}.tar" for n in range(4)]


def stream_config(tiny_base, tmp_path, out, **overrides):
    data = tmp_path / "shards"
    if not data.is_dir():
        prepare_shards(tmp_path, 16, 4)  # 4 shards of 4
    common = dict(train_batch_size=4, dataloader_num_workers=0, shuffle_buffer=6, random_flip=True,
                  proportion_empty_prompts=0.5, latent_cache_dir=str(tmp_path / "cache"), train_data_dir=str(data))
    return tiny_config(tiny_base, None, tmp_path / out, **dict(common, **overrides))


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
    for a, b in zip(live, cached):
        for key in a:
            if key == "text":  # the text encoder ran at another batch composition: equal to float rounding
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(a[key], b[key]), key


def test_a_cached_streamed_run_resumed_mid_epoch_ends_with_the_uninterrupted_runs_weights(tiny_base, tmp_path):
    straight = stream_config(tiny_base, tmp_path, "straight", cache="auto", max_train_steps=4, checkpointing_steps=2)
    reference = train_recording_batches(fresh_setup(straight))  # 4 steps = one epoch of 16
    stopped = stream_config(tiny_base, tmp_path, "stopped", cache="auto", max_train_steps=2, checkpointing_steps=2)
    train_recording_batches(fresh_setup(stopped))
    resumed = train_recording_batches(fresh_setup(stream_config(
        tiny_base, tmp_path, "stopped", cache="auto", max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest")))
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in reference[2:]]
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
