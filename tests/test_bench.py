"""`zeroconv bench` on the tiny config: every figure is there and positive (no timing assertions)."""

import json

import pytest

from zeroconv.bench import BUCKETS, config_names_as_configs, main
from zeroconv.errors import UserError


def test_bench_tiny_reports_every_figure(tmp_path, monkeypatch, capsys):
    import zeroconv.bench as bench

    monkeypatch.setattr(bench, "matmul_peak_flops", lambda: 1e10)  # the real one spends 3 s measuring
    out = tmp_path / "bench.json"
    assert main(["--config", "tiny", "--resolution", "32", "--batch_size", "2", "--steps", "1", "--warmup", "1",
                 "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"uncached", "cached"}
    for r in results.values():
        for key in ("samples_per_s", "step_seconds", "peak_rss_bytes", "model_flops_per_sample", "model_flops_per_s",
                    "controlnet_parameters", "setup_seconds"):
            assert r[key] > 0, key
        assert set(r["step_breakdown_seconds"]) == {*BUCKETS, "other"}
        for bucket in ("controlnet_forward", "unet_forward", "backward", "optimizer"):
            assert r["step_breakdown_seconds"][bucket] > 0, bucket
    # the uncached step runs the VAE and text encoder, the cached one does not
    assert results["uncached"]["encoder_flops_per_sample"] > 0 == results["cached"]["encoder_flops_per_sample"]
    assert results["uncached"]["model_flops_per_sample"] == results["cached"]["model_flops_per_sample"]
    assert report["cache_builds"]["tiny"]["bytes"] > 0 and report["ratios"]["tiny"]["speedup"] > 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "tiny: speedup" in printed


def test_bench_arguments():
    assert config_names_as_configs(["--config", "tiny", "small"]) == ["--configs", "tiny", "small"]
    assert config_names_as_configs(["--config", "run.yaml"]) == ["--config", "run.yaml"]
    with pytest.raises(UserError, match="--variants"):
        main(["--config", "tiny", "--variants", "cached+fast"])


def test_cpu_attention_flops_are_counted():
    """SDPA on CPU runs flash-attention kernels that torch's FLOP counter does not know; the bench adds them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from zeroconv.bench import count_cpu_attention_flops

    count_cpu_attention_flops()
    count_cpu_attention_flops()  # twice is harmless
    q = torch.randn(2, 4, 64, 8, requires_grad=True)
    kv = torch.randn(2, 4, 16, 8, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv).sum().backward()
    forward = 2 * 2 * (2 * 4 * 64 * 16 * 8)  # q @ k^T and p @ v
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu"] == forward
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == forward * 5 // 2


def test_toy_config_is_the_toy_base_architecture(tmp_path):
    from diffusers import UNet2DConditionModel

    from zeroconv.bench import build_base
    from zeroconv.models import toy_base

    folder = build_base("toy", tmp_path / "toy")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    expected = toy_base.build_unet().config
    assert list(unet.config.block_out_channels) == list(expected.block_out_channels)
    assert list(unet.config.down_block_types) == list(expected.down_block_types)
    assert (folder / "vae" / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file()


def test_bench_source_resolution_writes_larger_images(tmp_path, monkeypatch):
    """--source_resolution N stores the synthetic set as N px Fill PNGs (the uncached loader resizes them each
    step); the cache is built from the same files at the training resolution, keyed apart from other resolutions."""
    from PIL import Image

    import zeroconv.bench as bench
    from zeroconv.config import TrainConfig
    from zeroconv.train.cache import build_for_training

    monkeypatch.setattr(bench, "matmul_peak_flops", lambda: 1e10)
    out, work = tmp_path / "bench.json", tmp_path / "work"
    assert main(["--config", "tiny", "--resolution", "32", "--batch_size", "2", "--steps", "1", "--warmup", "1",
                 "--source_resolution", "96", "--workdir", str(work), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    data = work / "tiny" / "fill-96px-64"
    assert report["datasets"]["tiny"]["folder"] == str(data) and report["datasets"]["tiny"]["source_resolution"] == 96
    rows = [json.loads(line) for line in (data / "prompt.json").read_text().splitlines()]
    assert len(rows) == 64 and rows[0]["prompt"].endswith("background")
    for row in rows[:4]:
        for key in ("source", "target"):
            with Image.open(data / row[key]) as image:
                assert image.size == (96, 96) and image.format == "PNG"
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"uncached", "cached"}
    for r in results.values():
        assert r["resolution"] == 32 and r["source_resolution"] == 96 and r["samples_per_s"] > 0
    # one cache, at the training resolution; another resolution of the same files gets its own
    cache_root = work / "tiny" / "cache"
    first = [p for p in cache_root.iterdir() if p.is_dir()]
    assert len(first) == 1
    other = build_for_training(TrainConfig(pretrained_model_name_or_path=str(work / "tiny" / "base"),
                                           train_data_dir=str(data), resolution=48, train_batch_size=2, seed=0,
                                           mixed_precision="no", latent_cache_dir=str(cache_root)))
    assert other.folder != first[0] and other.folder.parent == cache_root


def test_bench_source_resolution_is_checked():
    with pytest.raises(UserError, match="--source_resolution"):
        main(["--config", "tiny", "--source_resolution", "8"])
