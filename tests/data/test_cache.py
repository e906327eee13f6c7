"""The latent cache (issue 5): same UNet inputs as the live encoders, keyed so it is never used for another setup."""

import json
from pathlib import Path

import pytest
import torch

from tests.train.helpers import run_training, tiny_config
from zeroconv.data import cache as cache_module
from zeroconv.data.cache import CachedDataset, LatentCache, cache_key
from zeroconv.train.cache import build_for_training


def unet_inputs(cfg):
    """(noisy latents, timesteps, text states, condition, batch indices) of every UNet call of a short run."""
    from accelerate.state import AcceleratorState, GradientState

    from zeroconv.train.loop import train_loop
    from zeroconv.train.run import setup

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    t = setup(cfg)
    seen = []

    def record(_module, args, kwargs):
        seen.append({"noisy": args[0].clone(), "timesteps": args[1].clone(),
                     "text": kwargs["encoder_hidden_states"].clone()})

    def record_condition(_module, _args, kwargs):
        seen.append({"condition": kwargs["controlnet_cond"].clone()})

    t.unet.register_forward_pre_hook(record, with_kwargs=True)
    t.accelerator.unwrap_model(t.controlnet).register_forward_pre_hook(record_condition, with_kwargs=True)
    batches = t.batches
    indices = []

    def spy():
        for batch in batches:
            indices.append(batch["index"].tolist())
            yield batch

    t.batches = spy()
    assert train_loop(t) == 0
    t.accelerator.end_training()
    return seen, indices, t


def assert_same_unet_inputs(live: list[dict], cached: list[dict]) -> None:
    """unet_inputs of a live and a cached run: equal, but for the text states to float rounding."""
    for a, b in zip(live, cached, strict=True):
        for key in a:
            if key == "text":  # the text encoder ran at another batch composition: equal to float rounding
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(a[key], b[key]), key


def test_cached_run_feeds_the_unet_the_same_noisy_latents(tiny_base, tiny_dataset, tmp_path):
    common = dict(max_train_steps=3, random_flip=True, proportion_empty_prompts=0.5,
                  latent_cache_dir=str(tmp_path / "cache"))
    live, live_indices, t_live = unet_inputs(tiny_config(tiny_base, tiny_dataset, tmp_path / "live", **common))
    cached, cached_indices, t_cached = unet_inputs(tiny_config(tiny_base, tiny_dataset, tmp_path / "cached",
                                                               cache="auto", **common))
    assert isinstance(t_cached.dataset, CachedDataset) and not isinstance(t_live.dataset, CachedDataset)
    assert cached_indices == live_indices  # same order
    assert len(live) == len(cached) == 6  # ControlNet + UNet per step
    flips_seen = {t_live.dataset.draws(i)[0] for step in live_indices for i in step}
    assert flips_seen == {True, False}  # both cached variants were used
    assert_same_unet_inputs(live, cached)
    # the VAE and text encoder left the training device's working set: the cached step never calls them
    assert t_cached.encoders.__class__.__name__ == "CachedEncoders"


@pytest.mark.parametrize("condition", [None, "canny"])
def test_cached_items_match_dataset_items_with_a_bad_sample(tiny_base, tmp_path, condition):
    from zeroconv.data.conditions import get_extractor
    from zeroconv.data.dataset import ControlNetDataset
    from zeroconv.data.sources import load_examples
    from zeroconv.data.transforms import PairedTransform
    from zeroconv.models.base import load_base
    from zeroconv.testing import make_image_dataset

    data = make_image_dataset(tmp_path / "data", n=6, size=64)
    (data / "0002.png").write_bytes(b"not a png")
    cfg = tiny_config(tiny_base, data, tmp_path / "out", random_flip=True, latent_cache_dir=str(tmp_path / "c"),
                      train_batch_size=2, condition=condition)
    cache = build_for_training(cfg)
    assert cache.unreadable == {2}
    assert cache.manifest["conditions"] is (condition is None)  # extracted conditions change every epoch

    def dataset():
        return ControlNetDataset(load_examples(cfg), PairedTransform(64), seed=7, random_flip=True,
                                 condition_fn=get_extractor(condition, seed=7) if condition else None)

    source, cached = dataset(), CachedDataset(cache, dataset())
    vae = load_base(str(tiny_base)).vae
    for epoch in (0, 1):
        source.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(source)):
            want, got = source[i], cached[i]
            for key in ("index", "skipped", "caption"):
                assert want[key] == got[key], (epoch, i, key)
            assert torch.equal(want["conditioning_pixel_values"], got["conditioning_pixel_values"])
            with torch.no_grad():
                posterior = vae.encode(want["pixel_values"][None]).latent_dist
            torch.testing.assert_close(got["latent_mean"], posterior.mean[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["latent_std"], posterior.std[0], rtol=1e-5, atol=1e-5)
    assert cached[2]["index"] == 3 and cached[2]["skipped"] == 1


def test_cache_reused_and_never_used_for_another_resolution_base_or_dataset(tiny_base, tmp_path, monkeypatch):
    from zeroconv.testing import make_image_dataset, make_tiny_base

    data = make_image_dataset(tmp_path / "data", n=4, size=64)
    root = tmp_path / "cache"
    first = build_for_training(tiny_config(tiny_base, data, tmp_path / "o", latent_cache_dir=str(root)))
    shard = first.folder / "shard-00000.safetensors"
    stamp = shard.stat().st_mtime_ns

    built = []
    real_build = cache_module.build_cache
    monkeypatch.setattr(cache_module, "build_cache", lambda *a, **k: built.append(1) or real_build(*a, **k))
    again = build_for_training(tiny_config(tiny_base, data, tmp_path / "o", latent_cache_dir=str(root)))
    assert again.folder == first.folder and not built and shard.stat().st_mtime_ns == stamp

    smaller = build_for_training(tiny_config(tiny_base, data, tmp_path / "o", latent_cache_dir=str(root),
                                             resolution=32))
    other_base = make_tiny_base(tmp_path / "base2", seed=1)
    other = build_for_training(tiny_config(other_base, data, tmp_path / "o", latent_cache_dir=str(root)))
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace("a red", "a blue"))
    edited = build_for_training(tiny_config(tiny_base, data, tmp_path / "o", latent_cache_dir=str(root)))
    folders = {first.folder, smaller.folder, other.folder, edited.folder}
    assert len(folders) == 4 and len(built) == 3
    assert smaller.tensor("shard-00000.safetensors", "condition", 0).shape[-1] == 32
    # a folder opened with another setup's identity is refused, whatever its name
    identity = smaller.manifest["identity"]
    assert LatentCache.open(first.folder, identity) is None
    assert LatentCache.open(smaller.folder, identity) is not None
    assert cache_key(identity) == smaller.folder.name
    assert first.manifest["identity"]["resolution"] == 64 and identity["resolution"] == 32
    # the first cache is kept as it was
    assert shard.stat().st_mtime_ns == stamp


def test_interrupted_build_resumes_from_finished_shards(tiny_base, tmp_path, monkeypatch):
    from zeroconv.testing import make_image_dataset

    data = make_image_dataset(tmp_path / "data", n=8, size=64)
    monkeypatch.setattr(cache_module, "shard_size", lambda *a, **k: 4)  # two shards
    calls = []
    real = cache_module.build_shard

    def fail_second(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "build_shard", fail_second)
    cfg = tiny_config(tiny_base, data, tmp_path / "o", latent_cache_dir=str(tmp_path / "c"))
    with pytest.raises(KeyboardInterrupt):
        build_for_training(cfg)
    monkeypatch.setattr(cache_module, "build_shard", real)
    calls.clear()
    monkeypatch.setattr(cache_module, "build_shard", lambda path, *a, **k: calls.append(Path(path).name)
                        or real(path, *a, **k))
    cache = build_for_training(cfg)
    assert calls == ["shard-00001.safetensors"]  # shard 0 was kept from the interrupted build
    assert cache.num_samples == 8 and not Path(str(cache.folder) + ".partial").exists()


def test_cache_command_and_train_cache_only(tiny_base, tiny_dataset, tmp_path, capsys):
    from zeroconv.cli import main

    root = tmp_path / "cache"
    args = ["--pretrained_model_name_or_path", str(tiny_base), "--train_data_dir", str(tiny_dataset),
            "--resolution", "64", "--train_batch_size", "4", "--latent_cache_dir", str(root)]
    assert main(["cache", *args]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_samples"] == 32 and len(manifest["captions"]) == 3
    # train --cache only finds the same cache (same flags) and stops there
    cfg = tiny_config(tiny_base, tiny_dataset, tmp_path / "out", cache="only", latent_cache_dir=str(root))
    assert run_training(cfg) == 0
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [folder.name]  # .<key>.lock aside
    assert not (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()
    assert main(["cache", *args, "--train_data_dir", str(tmp_path / "missing")]) == 2


def test_cache_command_then_train_cache_auto_reuses_it_without_rebuilding(tiny_base, tiny_dataset, tmp_path, capsys,
                                                                           monkeypatch):
    from zeroconv.cli import main

    root = tmp_path / "cache"
    assert main(["cache", "--pretrained_model_name_or_path", str(tiny_base), "--train_data_dir", str(tiny_dataset),
                 "--resolution", "64", "--train_batch_size", "4", "--latent_cache_dir", str(root)]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    monkeypatch.setattr(cache_module, "build_cache", lambda *a, **k: pytest.fail("train rebuilt the cache"))
    cfg = tiny_config(tiny_base, tiny_dataset, tmp_path / "out", cache="auto", latent_cache_dir=str(root),
                      max_train_steps=2)
    assert run_training(cfg) == 0
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [folder.name]  # .<key>.lock aside
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()


def test_two_runs_building_the_same_cache_at_once_both_succeed(tiny_base, tiny_dataset, tmp_path):
    """A sweep starts several runs on one dataset: they must not write the same shards into one .partial folder."""
    import os
    import subprocess
    import sys

    root = tmp_path / "caches"
    command = [sys.executable, "-m", "zeroconv", "cache", "--pretrained_model_name_or_path", str(tiny_base),
               "--train_data_dir", str(tiny_dataset), "--resolution", "64", "--train_batch_size", "2",
               "--latent_cache_dir", str(root), "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(folders) == 1 and len(list(root.glob("*/manifest.json"))) == 1
    assert not list(root.glob("*.partial"))
    logs = "".join(err for _, err in outputs)
    assert logs.count("latent cache: building") == 1  # the other waited and reused it


def test_the_cache_encodes_captions_dataset_preprocess_batch_size_at_a_time():
    from zeroconv.data.cache import Encoders

    calls = []

    def encode(captions):
        calls.append(len(captions))
        return {"hidden": torch.zeros(len(captions), 2)}

    captions = [f"caption {i}" for i in range(7)]
    for prompt_batch_size, expected in ((None, [2, 2, 2, 1]), (3, [3, 3, 1])):
        calls.clear()
        encoders = Encoders(None, encode, {"hidden": (2,)}, torch.device("cpu"), torch.float32, 2,
                            prompt_batch_size=prompt_batch_size)
        assert encoders.prompts(captions)["hidden"].shape == (7, 2) and calls == expected
