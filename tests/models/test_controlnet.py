import pytest
import torch

from zeroconv.models.base import load_base
from zeroconv.models.controlnet import build_controlnet, condition_encoder_channels, predict_noise


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(str(tiny_base))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g),
            torch.rand(2, 3, 64, 64, generator=g))


def test_untrained_controlnet_leaves_base_prediction_bit_identical(base):
    controlnet = build_controlnet(base.unet, base.vae_scale_factor)
    x, t, h, c = inputs()
    with torch.no_grad():
        joined = predict_noise(base.unet, controlnet, x, t, h, c)
        alone = base.unet(x, t, encoder_hidden_states=h).sample
    assert torch.equal(joined, alone)


def test_trained_controlnet_changes_prediction(base):
    controlnet = build_controlnet(base.unet, base.vae_scale_factor)
    with torch.no_grad():
        for conv in controlnet.controlnet_down_blocks:
            conv.weight.normal_(0, 0.1)
    x, t, h, c = inputs()
    with torch.no_grad():
        assert not torch.equal(predict_noise(base.unet, controlnet, x, t, h, c),
                               base.unet(x, t, encoder_hidden_states=h).sample)


def test_only_mid_control_passes_no_down_residuals(base, monkeypatch):
    controlnet = build_controlnet(base.unet, base.vae_scale_factor)
    seen = {}
    original = base.unet.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(base.unet, "forward", spy)
    x, t, h, c = inputs()
    predict_noise(base.unet, controlnet, x, t, h, c, only_mid_control=True)
    down = seen["down_block_additional_residuals"]
    assert all(torch.count_nonzero(r) == 0 and r.grad_fn is None for r in down)
    assert seen["mid_block_additional_residual"] is not None
    with torch.no_grad():
        predict_noise(base.unet, controlnet, x, t, h, c, only_mid_control=False)
    assert len(seen["down_block_additional_residuals"]) == len(controlnet.controlnet_down_blocks)


def test_condition_encoder_matches_vae_downsampling():
    assert condition_encoder_channels(8) == (16, 32, 96, 256)
    assert condition_encoder_channels(4) == (16, 32, 96)
    with pytest.raises(ValueError):
        condition_encoder_channels(6)


def test_condition_reaches_latent_grid(base):
    controlnet = build_controlnet(base.unet, base.vae_scale_factor, conditioning_channels=1)
    x, t, h, _ = inputs()
    down, mid = controlnet(x, t, encoder_hidden_states=h, controlnet_cond=torch.rand(2, 1, 64, 64), return_dict=False)
    assert down[0].shape[-2:] == x.shape[-2:]


def condition_scale_at_last_conv(controlnet, condition):
    """Std of what the condition encoder hands its (zero) last conv, over the std of the condition."""
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        h = torch.nn.functional.silu(embedding.conv_in(condition))
        for conv in embedding.blocks:
            h = torch.nn.functional.silu(conv(h))
    return (h.std() / condition.std()).item()


@pytest.mark.parametrize("vae_scale_factor", [4, 8])
def test_unit_variance_init_passes_the_condition_on_at_its_scale(base, vae_scale_factor):
    torch.manual_seed(0)
    condition = torch.rand(2, 3, 64, 64) * 2 - 1
    paper = build_controlnet(base.unet, vae_scale_factor, condition_encoder_init="paper")
    unit = build_controlnet(base.unet, vae_scale_factor, condition_encoder_init="unit_variance")
    paper_scale = condition_scale_at_last_conv(paper, condition)
    unit_scale = condition_scale_at_last_conv(unit, condition)
    assert paper_scale < 0.05  # the default init all but silences the condition
    assert 0.1 < unit_scale < 5.0 and unit_scale > 5 * paper_scale
    # the last conv is still zero, so the untrained ControlNet still changes nothing
    assert torch.count_nonzero(unit.controlnet_cond_embedding.conv_out.weight) == 0
    x, t, h, c = inputs()
    if vae_scale_factor == base.vae_scale_factor:
        with torch.no_grad():
            assert torch.equal(predict_noise(base.unet, unit, x, t, h, c), base.unet(x, t, encoder_hidden_states=h).sample)


def test_unknown_condition_encoder_init_is_refused(base):
    with pytest.raises(ValueError, match="unit_variance"):
        build_controlnet(base.unet, base.vae_scale_factor, condition_encoder_init="xavier")


def test_an_unset_init_builds_zeroconvs_default_unit_variance_and_paper_is_one_flag_away(base, tmp_path):
    from zeroconv import cli

    def condition_encoder(folder):
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(folder).controlnet_cond_embedding.state_dict()

    written = {}
    for name, flags in {"unset": [], "unit_variance": ["--condition_encoder_init", "unit_variance"],
                        "paper": ["--condition_encoder_init", "paper"]}.items():
        assert cli.main(["init", "--base", "toy", "--out", str(tmp_path / name), "--seed", "3", *flags]) == 0
        written[name] = condition_encoder(tmp_path / name)
    assert all(torch.equal(written["unset"][k], written["unit_variance"][k]) for k in written["unset"])
    assert not all(torch.equal(written["unset"][k], written["paper"][k]) for k in written["unset"])
    family = base.family  # the family resolves it; the textbook builder keeps the paper's init
    torch.manual_seed(0)
    unset = family.build_controlnet(base).controlnet_cond_embedding.state_dict()
    torch.manual_seed(0)
    unit = build_controlnet(base.unet, base.vae_scale_factor, condition_encoder_init="unit_variance")
    assert all(torch.equal(unset[k], unit.controlnet_cond_embedding.state_dict()[k]) for k in unset)
