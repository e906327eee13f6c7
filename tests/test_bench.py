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
