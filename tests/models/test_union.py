"""The union ControlNet (zeroconv.models.union) on the tiny SDXL UNet: zero convs, and the grouped training call
equal to the pipeline's call per sample."""

import pytest
import torch

from zeroconv.models.controlnet import build_controlnet, predict_noise
from zeroconv.models.union import control_type_vector, union_residuals
from zeroconv.testing import tiny_sdxl_unet


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_sdxl_unet().eval()


def batch(size: int = 4, types: int = 2):
    generator = torch.Generator().manual_seed(1)
    added = {"text_embeds": torch.randn(size, 40, generator=generator), "time_ids": torch.full((size, 6), 64.0)}
    return (torch.randn(size, 4, 8, 8, generator=generator), torch.randint(0, 1000, (size,), generator=generator),
            torch.randn(size, 77, 80, generator=generator), torch.rand(size, types, 3, 16, 16, generator=generator),
            added)


def test_untrained_union_controlnet_leaves_base_prediction_bit_identical(unet):
    controlnet = build_controlnet(unet, 2, num_control_types=2)
    noisy, timesteps, hidden, conditions, added = batch()
    given = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=torch.bool)
    with torch.no_grad():
        base = unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        pred = predict_noise(unet, controlnet, noisy, timesteps, hidden, conditions, added_cond_kwargs=added,
                             control_types=given)
    assert torch.equal(pred, base)
    assert controlnet.config.num_control_type == 2 and controlnet.config.num_trans_channel == 16
    # the add-embedding starts from the UNet's, as the plain ControlNet's does (diffusers' union from_unet skips it)
    assert torch.equal(controlnet.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)


def test_a_mixed_batch_gets_what_the_pipeline_call_gives_each_sample_alone(unet):
    torch.manual_seed(2)
    controlnet = build_controlnet(unet, 2, num_control_types=3).eval()
    with torch.no_grad():  # trained weights: the zero convs and the control-type path now carry signal
        for parameter in controlnet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    noisy, timesteps, hidden, conditions, added = batch(5, 3)
    given = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        down, mid = union_residuals(controlnet, noisy, timesteps, hidden, conditions, given, added)
        for row in range(len(given)):
            types = given[row].nonzero().squeeze(1).tolist()
            alone_down, alone_mid = controlnet(  # as StableDiffusionXLControlNetUnionPipeline calls it
                noisy[row:row + 1], timesteps[row:row + 1], encoder_hidden_states=hidden[row:row + 1],
                controlnet_cond=[conditions[row:row + 1, k] for k in types],
                control_type=control_type_vector(types, 3, 1, "cpu", torch.float32), control_type_idx=types,
                added_cond_kwargs={k: v[row:row + 1] for k, v in added.items()}, return_dict=False)
            torch.testing.assert_close(mid[row:row + 1], alone_mid, rtol=1e-4, atol=1e-4)
            for level, alone in zip(down, alone_down):
                torch.testing.assert_close(level[row:row + 1], alone, rtol=1e-4, atol=1e-4)
        # and a condition not given is not read: changing it changes nothing
        changed = conditions.clone()
        changed[0, 1] = 1.0
        assert torch.equal(union_residuals(controlnet, noisy, timesteps, hidden, changed, given, added)[1], mid)
        changed[0, 0] = 1.0
        assert not torch.equal(union_residuals(controlnet, noisy, timesteps, hidden, changed, given, added)[1], mid)
