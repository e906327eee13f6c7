"""A streamed run, of webdataset shards or of a `datasets` dataset's parquet files (--streaming), trains,
checkpoints, is killed, and resumes without repeating a consumed shard (issue 16)."""

import json
import shutil
import signal

import pytest
import torch

from tests.data.test_stream import opened, prepare_shards, shard_log, write_photos
from tests.train.helpers import controlnet_weights, fresh_setup, losses, tiny_config, train_recording_batches
from tests.train.test_reliability import start_trainer, wait_for
from zeroconv.errors import UserError


def photo_parquet(tmp_path, n: int, per_file: int):
    """prepare_shards' photos as a `datasets` dataset of parquet files (Image features), the condition the photo's
    grayscale: `--dataset_name <folder> --streaming`."""
    import datasets
    from PIL import Image

    photos, out = tmp_path / "photos", tmp_path / "parquet"
    write_photos(photos, n)
    out.mkdir()
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    files = -(-n // per_file)
    for number in range(files):
        rows = range(number * per_file, min(n, (number + 1) * per_file))
        images = [Image.open(photos / f"img{i:03d}.png").convert("RGB") for i in rows]
        datasets.Dataset.from_dict({"image": images, "conditioning_image": [im.convert("L").convert("RGB")
                                                                             for im in images],
                                    "text": [f"photo {i}" for i in rows]}, features=features).to_parquet(
            out / f"train-{number:05d}-of-{files:05d}.parquet")
    return out


# kind: (its data as tiny_config's overrides, shard n's file name)
def streamed_data(kind: str, tmp_path):
    if kind == "webdataset":
        data = prepare_shards(tmp_path, 32, 4)  # 8 shards of 4
        return dict(train_data_dir=str(data)), lambda n: f"shard-{n:06d}.tar"
    data = photo_parquet(tmp_path, 32, 4)  # 8 parquet files of 4 rows
    return (dict(train_data_dir=None, dataset_name=str(data), streaming=True),
            lambda n: f"train-{n:05d}-of-00008.parquet")


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_a_streamed_run_killed_after_a_checkpoint_resumes_with_the_unconsumed_shards_only(
        tiny_base, tmp_path, monkeypatch, kind):
    source, shard_name = streamed_data(kind, tmp_path)
    # 2 loader workers of 4 shards each, batch 4: 8 steps an epoch; checkpoint-4 lies mid-epoch, mid-shard. Live
    # (--cache off): the shards read are what this test watches (the cached stream reads none, test_stream_cache.py)
    common = dict(train_batch_size=4, dataloader_num_workers=2, shuffle_buffer=6, random_flip=True,
                  checkpointing_steps=2, cache="off", **source)
    straight = tmp_path / "straight"
    reference = train_recording_batches(fresh_setup(tiny_config(tiny_base, None, straight, max_train_steps=8,
                                                                **common)))
    epoch = [batch["index"].tolist() for batch in reference]
    assert sorted(i for batch in epoch for i in batch) == list(range(32))  # every sample once in the epoch

    out = tmp_path / "killed"
    proc = start_trainer(tiny_config(tiny_base, None, out, max_train_steps=16, **common),
                         ZEROCONV_TEST_SLOW_CHECKPOINT="2")
    try:
        wait_for(lambda: (out / "checkpoint-4" / "COMPLETE").is_file())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not (out / "checkpoint-8").exists()  # killed in mid-epoch
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (0, 4) and state["stream"]["workers"] == 2

    log = shard_log(monkeypatch, tmp_path)
    resumed = train_recording_batches(fresh_setup(tiny_config(tiny_base, None, out, max_train_steps=8,
                                                              resume_from_checkpoint="latest", **common)))
    rest = [batch["index"].tolist() for batch in resumed]
    assert rest == epoch[4:]  # the uninterrupted run's batches 5-8, in its order
    before_kill = {i for batch in epoch[:4] for i in batch}
    consumed = {shard_name(n) for n in range(8) if set(range(4 * n, 4 * n + 4)) <= before_kill}
    assert consumed  # whole shards lay behind the checkpoint...
    assert opened(log) and not consumed & set(opened(log))  # ...and the resumed run never opened one of them
    assert sorted(before_kill | {i for batch in rest for i in batch}) == list(range(32))
    assert not before_kill & {i for batch in rest for i in batch}  # no sample of the epoch twice

    a, b = (controlnet_weights(run / "checkpoint-8") for run in (straight, out))  # the uninterrupted run's model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {s: v for s, v in losses(out).items() if s > 4} == {s: v for s, v in losses(straight).items() if s > 4}

    # a mid-epoch position means nothing in another layout: refused, naming what differs
    other = dict(common, dataloader_num_workers=0)
    with pytest.raises(UserError, match="another stream layout.*workers: checkpoint 2 vs now 1"):
        fresh_setup(tiny_config(tiny_base, None, tmp_path / "other", max_train_steps=8,
                                resume_from_checkpoint=str(out / "checkpoint-4"), **other))
    if kind == "parquet":  # the same files under another dataset's name: a checkpoint resumes on its dataset only
        copy = shutil.copytree(source["dataset_name"], tmp_path / "another")
        with pytest.raises(UserError, match="made by a different run.*streamed_dataset"):
            fresh_setup(tiny_config(tiny_base, None, tmp_path / "other", max_train_steps=8,
                                    resume_from_checkpoint=str(out / "checkpoint-8"),
                                    **dict(common, dataset_name=str(copy))))


TWO_PROCESS_FLAGS = ("--shuffle_buffer", "3", "--checkpointing_steps", "5")


@pytest.fixture(scope="module")
def two_processes_live(tiny_base, tmp_path_factory):
    """(data, output_dir) of a live 2-process run on 7 shards (the last of 2), batch 2, 10 steps; read only."""
    from tests.train.test_distributed import launch_two

    tmp_path = tmp_path_factory.mktemp("two_processes_live")
    data, out = prepare_shards(tmp_path, 26, 4), tmp_path / "two"
    launch_two(tiny_base, data, out, 10, *TWO_PROCESS_FLAGS)
    return data, out


def test_two_processes_stream_unequal_shards_in_equal_steps(two_processes_live):
    """7 shards (the last of 2) on 2 processes: one takes 4 shards, the other 3, and both take 8 batches of 2 per
    epoch (the shorter stream fills up), so DDP's collectives pair up and the run ends instead of hanging."""
    _data, out = two_processes_live
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 2)  # epoch 0 was 8 steps, on both ranks
    assert state["stream"]["world_size"] == 2 and sorted(losses(out)) == list(range(1, 11))


def test_two_processes_build_the_stream_cache_together_and_train_the_live_runs_losses(
        tiny_base, tmp_path, two_processes_live):
    """The same run cached (--cache on): both processes encode their share of the 7 data shards into the cache,
    then each is served from it the batches, fill-up included, it streams live: the live losses, step by step."""
    from tests.train.test_distributed import launch_two

    data, live = two_processes_live
    root, out = tmp_path / "cache", tmp_path / "cached"
    launch_two(tiny_base, data, out, 10, *TWO_PROCESS_FLAGS, "--cache", "on", "--latent_cache_dir", str(root))
    (folder,) = [f for f in root.iterdir() if (f / "manifest.json").is_file()]
    assert sorted(f.name for f in folder.glob("shard-*")) == [f"shard-{n:05d}.safetensors" for n in range(7)]
    expected, cached = losses(live), losses(out)
    assert sorted(cached) == sorted(expected) == list(range(1, 11))
    for step in expected:  # the text encoder ran at other batch compositions: equal to float rounding
        assert abs(expected[step] - cached[step]) <= 1e-5 * abs(expected[step]), step
