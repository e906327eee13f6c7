"""Training an SDXL ControlNet (issue 13) on the tiny SDXL base: the size/crop micro-conditioning from the data,
exact resume, the latent cache, and sampling what was trained."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train.helpers import (controlnet_weights, fresh_setup, losses, run_training, tiny_config,
                                 train_recording_batches)


def unet_calls(cfg):
    """Per UNet call of a short run: its added_cond_kwargs, hidden states and noisy input; and the batches."""
    t = fresh_setup(cfg)
    seen = []

    def record(_module, args, kwargs):
        seen.append({"noisy": args[0].clone(), "text": kwargs["encoder_hidden_states"].clone(),
                     **{k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}})

    t.unet.register_forward_pre_hook(record, with_kwargs=True)
    batches = train_recording_batches(t)
    return seen, batches, t


def gradient_pair(folder: Path, n: int = 4) -> Path:
    """`n` copies of one 300x200 (width x height) image whose pixels say where they are: red = column, green = row;
    its condition has the roles swapped, so a crop of either can be located from its pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conditioning").mkdir(exist_ok=True)
    x = np.linspace(0, 255, 300)[None, :].repeat(200, 0)
    y = np.linspace(0, 255, 200)[:, None].repeat(300, 1)
    image = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    condition = np.stack([y, x, np.zeros_like(x)], -1).round().astype(np.uint8)
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(n):
            Image.fromarray(image).save(folder / f"{i}.png")
            Image.fromarray(condition).save(folder / "conditioning" / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "conditioning_image_file_name": f"conditioning/{i}.png",
                                 "text": "a photo"}) + "\n")
    return folder


def test_random_crop_of_a_300x200_image_reaches_add_time_ids_and_both_pixels(tiny_sdxl_base, tmp_path):
    data = gradient_pair(tmp_path / "data")
    cfg = tiny_config(tiny_sdxl_base, data, tmp_path / "run", resolution=128, random_crop=True, max_train_steps=1)
    seen, batches, t = unet_calls(cfg)
    time_ids, batch = seen[0]["time_ids"], batches[0]
    crops = []
    for row, index in zip(time_ids.tolist(), batch["index"].tolist()):
        crop_y, crop_x = t.dataset.transform.crop((300, 200), t.dataset.draws(index)[2]).top_left
        assert row == [200, 300, crop_y, crop_x, 128, 128]
        crops.append((crop_y, crop_x))
    assert len(set(crops)) > 1 and all(y == 0 and 0 <= x <= 64 for y, x in crops)  # random, along the long side

    # the pixels are those of the 300x200 image resized to 192x128, then cropped at (crop_y, crop_x)
    source = Image.open(data / "0.png").resize((192, 128), Image.Resampling.BILINEAR)
    source_condition = Image.open(data / "conditioning" / "0.png").resize((192, 128), Image.Resampling.BILINEAR)
    for k, (crop_y, crop_x) in enumerate(crops):
        want = np.asarray(source)[crop_y:crop_y + 128, crop_x:crop_x + 128] / 127.5 - 1
        got = batch["pixel_values"][k].permute(1, 2, 0).numpy()
        assert np.abs(got - want)[:, 2:-2].max() < 0.05  # resampled once vs twice: equal but at the edges
        want_condition = np.asarray(source_condition)[crop_y:crop_y + 128, crop_x:crop_x + 128] / 255
        got_condition = batch["conditioning_pixel_values"][k].permute(1, 2, 0).numpy()
        assert np.abs(got_condition - want_condition)[:, 2:-2].max() < 0.03


def test_fixed_crop_flags_replace_the_crop_in_add_time_ids_only(tiny_sdxl_base, tmp_path):
    data = gradient_pair(tmp_path / "data")
    cfg = tiny_config(tiny_sdxl_base, data, tmp_path / "run", resolution=128, max_train_steps=1,
                      crops_coords_top_left_h=0, crops_coords_top_left_w=0)
    seen, batches, _ = unet_calls(cfg)
    assert seen[0]["time_ids"].tolist() == [[200, 300, 0, 0, 128, 128]] * 4
    # the pixels are still the center crop: columns 32..159 of the image resized to 192x128
    resized = np.asarray(Image.open(data / "0.png").resize((192, 128), Image.Resampling.BILINEAR))
    got = batches[0]["pixel_values"][0].permute(1, 2, 0).numpy()
    assert np.abs(got - (resized[:, 32:160] / 127.5 - 1))[:, 2:-2].max() < 0.05
    assert batches[0]["size_and_crop"].tolist() == [[200, 300, 0, 32]] * 4  # the true crop, as the data had it


def test_sdxl_training_resumes_bit_identically(tiny_sdxl_base, tiny_dataset, tmp_path):
    common = dict(train_batch_size=2, random_flip=True, proportion_empty_prompts=0.5, checkpointing_steps=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_training(tiny_config(tiny_sdxl_base, tiny_dataset, straight, max_train_steps=4, **common)) == 0
    assert run_training(tiny_config(tiny_sdxl_base, tiny_dataset, resumed, max_train_steps=2, **common)) == 0
    assert (resumed / "checkpoint-2" / "COMPLETE").is_file()
    assert run_training(tiny_config(tiny_sdxl_base, tiny_dataset, resumed, max_train_steps=4,
                                    resume_from_checkpoint="latest", **common)) == 0
    a, b = controlnet_weights(straight), controlnet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "add_embedding.linear_1.weight" in a
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    assert json.loads((straight / "config.json").read_text())["addition_embed_type"] == "text_time"


def test_cached_sdxl_run_feeds_the_unet_what_the_live_one_does(tiny_sdxl_base, tiny_dataset, tmp_path):
    common = dict(max_train_steps=2, random_flip=True, proportion_empty_prompts=0.5,
                  latent_cache_dir=str(tmp_path / "cache"))
    live, _, _ = unet_calls(tiny_config(tiny_sdxl_base, tiny_dataset, tmp_path / "live", **common))
    cached, _, t = unet_calls(tiny_config(tiny_sdxl_base, tiny_dataset, tmp_path / "cached", cache="auto", **common))
    assert t.encoders.__class__.__name__ == "CachedEncoders"
    cache_folder = next(p for p in (tmp_path / "cache").iterdir() if (p / "manifest.json").is_file())
    assert json.loads((cache_folder / "manifest.json").read_text())["prompts"] == ["pooled_prompt_embeds",
                                                                                 "prompt_embeds"]
    assert len(live) == len(cached) == 2
    for a, b in zip(live, cached):
        assert torch.equal(a["time_ids"], b["time_ids"])
        assert a["time_ids"][:, :4].tolist() == [[64, 64, 0, 0]] * 4  # the 64 px squares: no resize, no crop
        torch.testing.assert_close(a["noisy"], b["noisy"], rtol=0, atol=0)
        # the text encoders ran at another batch composition: equal to float rounding
        torch.testing.assert_close(a["text"], b["text"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["text_embeds"], b["text_embeds"], rtol=1e-5, atol=1e-6)
    # dropout reached the pooled embedding too: some samples got the empty prompt's
    from zeroconv.models.base import load_base

    base = load_base(str(tiny_sdxl_base))
    empty = base.family.encode_prompts(base, [""], "cpu")["pooled_prompt_embeds"][0]
    dropped = [torch.allclose(row, empty, atol=1e-6) for call in live for row in call["text_embeds"]]
    assert any(dropped) and not all(dropped)


def test_sample_uses_the_sdxl_controlnet_pipeline(tiny_sdxl_base, tmp_path):
    from zeroconv.models.base import load_base
    from zeroconv.sample import main

    base = load_base(str(tiny_sdxl_base))
    out = tmp_path / "controlnet"
    base.family.build_controlnet(base).save_pretrained(out)
    (out / "config.yaml").write_text(f"pretrained_model_name_or_path: {tiny_sdxl_base}\nresolution: 64\n")
    condition = tmp_path / "cond.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(condition)
    assert main(["--controlnet", str(out), "--image", str(condition), "--prompt", "a red square", "--steps", "2",
                 "--out", str(tmp_path / "samples")]) == 0
    images = sorted((tmp_path / "samples").glob("*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (64, 64)
    assert np.asarray(Image.open(images[0])).std() > 0  # an image, not a blank


def test_blog_command_trains_an_sdxl_controlnet(tiny_sdxl_base, tmp_path, monkeypatch):
    import shlex

    from tests.train.test_blog_command import BLOG_COMMAND, make_face_dataset
    from zeroconv.config import TrainConfig, parse

    dataset = make_face_dataset(tmp_path / "facesynthetics")
    for i in (1, 2, 3):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(tmp_path / f"face_landmarks{i}.jpeg")
    monkeypatch.chdir(tmp_path)
    # the blog's flags as written, at 128 px instead of 512 (the tiny base's cost, not its code paths)
    args = shlex.split(BLOG_COMMAND.format(base=tiny_sdxl_base, dataset=dataset)) + ["--resolution=128",
                                                                                      "--report_to=none"]
    cfg = parse(TrainConfig, args, prog="zeroconv train")
    assert run_training(cfg) == 0
    out = tmp_path / "model_out"
    assert json.loads((out / "config.json").read_text())["addition_embed_type"] == "text_time"
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 3  # 4 samples, batch 4, 3 epochs
    assert np.isfinite(list(losses(out).values())).all()
    grids = sorted((out / "validation").glob("*.png"))
    assert grids and np.asarray(Image.open(grids[-1])).std() > 0


def test_npu_flash_attention_is_warned_about_and_ignored_off_an_npu(tiny_sdxl_base, tiny_dataset, tmp_path, caplog):
    from zeroconv.train.setup import enable_npu_flash_attention

    cfg = tiny_config(tiny_sdxl_base, tiny_dataset, tmp_path, enable_npu_flash_attention=True)
    with caplog.at_level("WARNING", logger="zeroconv.train"):
        enable_npu_flash_attention(cfg, unet=None, controlnet=None)  # touching them would raise
    assert "--enable_npu_flash_attention: no Ascend NPU" in caplog.text


def test_all_black_validation_samples_are_reported_with_the_fix(caplog):
    from zeroconv.train.validate import warn_blank

    black, grey = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (90, 90, 90))
    with caplog.at_level("WARNING", logger="zeroconv.validate"):
        assert warn_blank([[grey, grey]], 5) == 0
        assert caplog.text == ""
        assert warn_blank([[black, grey], [black, black]], 10) == 3
    assert "step 10: 3 of 4 samples are all black" in caplog.text and "--mixed_precision bf16" in caplog.text


def test_random_crop_with_a_cache_is_refused_naming_both_flags(tiny_sdxl_base, tiny_dataset, tmp_path):
    from zeroconv.config import check_train_config
    from zeroconv.errors import UserError

    with pytest.raises(UserError, match=r"--random_crop with --cache on.*--cache off"):
        check_train_config(tiny_config(tiny_sdxl_base, tiny_dataset, tmp_path, random_crop=True, cache="on"))
    check_train_config(tiny_config(tiny_sdxl_base, tiny_dataset, tmp_path, random_crop=True))  # live: fine
