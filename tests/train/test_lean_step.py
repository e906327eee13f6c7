"""Lean-step choices of zeroconv.train.run: the channels_last auto rule and the AdamW implementation."""

from types import SimpleNamespace

import pytest
import torch

from zeroconv.config import TrainConfig, parse
from zeroconv.train.setup import adamw_implementation, channels_last_modules


@pytest.mark.parametrize("requested, resolution, factor, expected", [
    (None, 256, 8, "all"),          # 32x32 latents: the whole ControlNet and UNet
    (None, 512, 8, "all"),
    (None, 64, 8, "encoder"),       # tiny base: 8x8 latents, the condition encoder on 64x64 pixels
    (None, 64, 4, "encoder"),       # toy base: 16x16 latents
    (None, 16, 8, "none"),          # nothing runs on a 32x32 grid
    (True, 64, 8, "all"),           # an explicit flag wins
    (False, 512, 8, "none"),
])
def test_channels_last_auto_rule_judges_each_part_by_its_grid(requested, resolution, factor, expected):
    from zeroconv.models.families import get_family

    controlnet, unet = SimpleNamespace(controlnet_cond_embedding="encoder"), "unet"
    base = SimpleNamespace(vae_scale_factor=factor, family=get_family("sd"))
    chosen = channels_last_modules(requested, resolution, base, controlnet, unet)
    assert chosen == {"all": [controlnet, unet], "encoder": ["encoder"], "none": []}[expected]


def test_channels_last_auto_leaves_a_latent_conditioned_controlnet_alone_on_small_grids():
    """SD3 and Flux read the condition as VAE latents: no part of theirs runs on the pixel grid."""
    from zeroconv.models.families import get_family

    for family in ("sd3", "flux"):
        base = SimpleNamespace(vae_scale_factor=8, family=get_family(family))
        assert channels_last_modules(None, 64, base, SimpleNamespace(), "transformer") == []


def test_channels_last_is_never_chosen_under_fsdp_and_an_explicit_flag_is_warned(caplog):
    """FSDP refuses non-contiguous parameters: the auto rule and the flag both give way, the flag with a warning."""
    from zeroconv.models.families import get_family

    controlnet, unet = SimpleNamespace(controlnet_cond_embedding="encoder"), "unet"
    base = SimpleNamespace(vae_scale_factor=8, family=get_family("sd"))
    assert channels_last_modules(None, 512, base, controlnet, unet, "FSDP") == []
    assert not caplog.records
    with caplog.at_level("WARNING", logger="zeroconv.train"):
        assert channels_last_modules(True, 512, base, controlnet, unet, "FSDP") == []
    assert "FSDP" in caplog.text and "--channels_last" in caplog.text
    assert channels_last_modules(None, 512, base, controlnet, unet, "DeepSpeed") == [controlnet, unet]


def test_channels_last_flag_spellings():
    assert TrainConfig().channels_last is None
    assert parse(TrainConfig, ["--channels_last"], prog="zeroconv train").channels_last is True
    assert parse(TrainConfig, ["--channels_last", "false"], prog="zeroconv train").channels_last is False


def test_fused_adamw_on_cpu_matches_the_reference_loop():
    """fused=True is chosen on CPU and gives the plain per-tensor AdamW's weights to rounding."""
    torch.manual_seed(0)
    shapes = [(16, 8, 3, 3), (16,), (32, 16), (4, 4, 1, 1)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    choice = adamw_implementation([torch.nn.Parameter(p) for p in start])
    assert choice == {"fused": True}

    def train(**impl):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, **impl)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return params

    for fused, loop in zip(train(**choice), train(foreach=False)):
        assert not torch.equal(fused, torch.zeros_like(fused))
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-6)


def test_adamw_falls_back_to_foreach_for_non_float_or_empty():
    assert adamw_implementation([]) == {"foreach": True}
