"""Training with aspect-ratio buckets (--aspect_buckets, issue 13): one bucket a batch, image and condition cropped
alike, SDXL told what was done, exact mid-epoch resume, and the flags a resume must keep."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train.helpers import controlnet_weights, fresh_setup, losses, tiny_config, train_recording_batches

# (width, height) of the three shapes, and the default bucket each goes to at --resolution 64
SHAPES = {(96, 64): (80, 56), (64, 96): (56, 80), (64, 64): (64, 64)}


def three_shapes(folder: Path, per_shape: int = 4) -> Path:
    """`per_shape` images of each of 96x64, 64x96 and 64x64 whose pixels say where they are (red: column, green:
    row, blue: the sample's number); each condition is its image, so a crop of both must match pixel for pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as fh:
        for k in range(per_shape * len(SHAPES)):
            width, height = list(SHAPES)[k % len(SHAPES)]
            x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
            y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
            image = np.stack([x, y, np.full_like(x, 20 * k)], -1).round().astype(np.uint8)
            Image.fromarray(image).save(folder / f"{k}.png")
            fh.write(json.dumps({"file_name": f"{k}.png", "conditioning_image_file_name": f"{k}.png",
                                 "text": f"shape {k % 3}"}) + "\n")
    return folder


def train_and_watch(cfg):
    """Train as `zeroconv train` does and return (the batches the loop took, the run, the UNet's time_ids)."""
    t = fresh_setup(cfg)
    time_ids = []

    def record(_module, _args, kwargs):
        if kwargs.get("added_cond_kwargs"):
            time_ids.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    t.unet.register_forward_pre_hook(record, with_kwargs=True)
    batches = train_recording_batches(t)
    return batches, t, time_ids


def test_bucketed_sdxl_batches_hold_one_bucket_and_add_time_ids_say_what_was_done(tiny_sdxl_base, tmp_path):
    data = three_shapes(tmp_path / "data")
    cfg = tiny_config(tiny_sdxl_base, data, tmp_path / "run", aspect_buckets="default", train_batch_size=4,
                      max_train_steps=3)  # 12 samples: one epoch
    batches, t, time_ids = train_and_watch(cfg)
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(12))
    assert len({tuple(b["pixel_values"].shape[-2:]) for b in batches}) == 3
    for batch, ids in zip(batches, time_ids):
        for k, index in enumerate(batch["index"].tolist()):
            width, height = list(SHAPES)[index % 3]
            bucket_w, bucket_h = SHAPES[(width, height)]
            assert tuple(batch["pixel_values"][k].shape) == (3, bucket_h, bucket_w)
            # resized to cover the bucket (96x64 -> 84x56 into 80x56), centered: the crop lies 2 px in
            top, left = {(96, 64): (0, 2), (64, 96): (2, 0), (64, 64): (0, 0)}[(width, height)]
            assert ids[k].tolist() == [height, width, top, left, bucket_h, bucket_w]
            # and the pixels are that crop of the image resized to cover the bucket
            scale = max(bucket_w / width, bucket_h / height)
            resized = Image.open(data / f"{index}.png").resize((round(width * scale), round(height * scale)),
                                                                Image.Resampling.BILINEAR)
            want = np.asarray(resized)[top:top + bucket_h, left:left + bucket_w] / 127.5 - 1
            got = batch["pixel_values"][k].permute(1, 2, 0).numpy()
            assert np.abs(got - want)[2:-2, 2:-2].max() < 0.05
    assert t.encoders.__class__.__name__ == "LiveEncoders"  # --cache auto encodes a bucketed run live


def test_random_crops_in_buckets_cut_image_and_condition_identically(tiny_base, tmp_path):
    data = three_shapes(tmp_path / "data")
    cfg = tiny_config(tiny_base, data, tmp_path / "run", aspect_buckets="default", random_crop=True,
                      random_flip=True, train_batch_size=4, max_train_steps=3)
    batches, _, _ = train_and_watch(cfg)
    offsets = set()
    for batch in batches:
        # the condition is the image: after the same resize, crop and flip, image == condition pixel for pixel
        torch.testing.assert_close(batch["conditioning_pixel_values"] * 2 - 1, batch["pixel_values"],
                                   rtol=0, atol=1e-6)
        for (orig_h, orig_w, top, left), index in zip(batch["size_and_crop"].tolist(), batch["index"].tolist()):
            assert (orig_w, orig_h) == list(SHAPES)[index % 3]
            assert 0 <= top <= 4 and 0 <= left <= 4 and (top == 0 or left == 0)
            offsets.add((top, left))
    assert len(offsets) > 2  # the crops did move


def test_bucketed_resume_mid_epoch_continues_the_same_samples(tiny_base, tmp_path):
    data = three_shapes(tmp_path / "data", per_shape=2)
    common = dict(aspect_buckets="default", train_batch_size=2, random_flip=True, checkpointing_steps=2)
    straight, _, _ = train_and_watch(tiny_config(tiny_base, data, tmp_path / "straight", max_train_steps=5,
                                                 **common))
    first, _, _ = train_and_watch(tiny_config(tiny_base, data, tmp_path / "resumed", max_train_steps=2, **common))
    state = json.loads((tmp_path / "resumed" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (0, 2)  # 3 batches an epoch: mid-epoch
    rest, _, _ = train_and_watch(tiny_config(tiny_base, data, tmp_path / "resumed", max_train_steps=5,
                                             resume_from_checkpoint="latest", **common))
    indices = [b["index"].tolist() for b in straight]
    assert [b["index"].tolist() for b in first + rest] == indices
    assert sorted(sum(indices[:3], [])) == list(range(6)) and indices[3:] != indices[:2]  # epoch 2: a new order
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") and len(losses(tmp_path / "straight")) == 5
    a, b = controlnet_weights(tmp_path / "straight" / "checkpoint-4"), controlnet_weights(
        tmp_path / "resumed" / "checkpoint-4")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_crops_filter_or_buckets(tiny_base, tmp_path):
    from tests.train.helpers import run_training
    from zeroconv.errors import UserError

    data = three_shapes(tmp_path / "data", per_shape=1)
    out = tmp_path / "run"
    assert run_training(tiny_config(tiny_base, data, out, max_train_steps=1, checkpointing_steps=1,
                                    train_batch_size=1)) == 0
    saved = json.loads((out / "checkpoint-1" / "identity.json").read_text())
    # at their defaults the keys are left out: checkpoints from before they existed resume as they did
    assert not {"random_crop", "image_interpolation_mode", "aspect_buckets", "vae"} & set(saved)
    for flag, value in (("random_crop", True), ("image_interpolation_mode", "nearest"),
                        ("aspect_buckets", "default")):
        with pytest.raises(UserError, match=rf"made by a different run \({flag}: checkpoint .* vs now {value!r}"):
            run_training(tiny_config(tiny_base, data, out, max_train_steps=2, train_batch_size=1,
                                     resume_from_checkpoint="latest", **{flag: value}))


def test_buckets_with_cache_on_are_refused_naming_both_flags(tiny_base, tmp_path):
    from zeroconv.config import check_train_config
    from zeroconv.errors import UserError

    with pytest.raises(UserError, match=r"--aspect_buckets with --cache on.*--cache off"):
        check_train_config(tiny_config(tiny_base, tmp_path, tmp_path, aspect_buckets="default", cache="on"))
    with pytest.raises(UserError, match=r"--aspect_buckets 60x64"):
        check_train_config(tiny_config(tiny_base, tmp_path, tmp_path, aspect_buckets="60x64"))
