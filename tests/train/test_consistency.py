"""The consistency reward (--consistency_loss_weight, ControlNet++)."""

import pytest
import torch

from tests.train.helpers import losses, run_training, tiny_config
from zeroconv.data.conditions.differentiable import (check_differentiable, edge_distance, grayscale_distance,
                                                     soft_edges)
from zeroconv.errors import UserError


def test_soft_edges_find_a_step_and_the_distances_are_zero_for_their_own_extraction():
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0  # a vertical black-to-white step between columns 7 and 8
    edges = soft_edges(image)[0, 0]
    assert float(edges[:, 7:9].min()) > 0.99 and float(edges[:, :6].max()) < 1e-3 and float(edges[:, 10:].max()) < 1e-3
    assert float(edge_distance(image, soft_edges(image).repeat(1, 3, 1, 1))) == pytest.approx(0, abs=1e-12)
    assert float(edge_distance(image, torch.zeros(1, 3, 16, 16))) > 0.01
    from cv2 import COLOR_RGB2GRAY, cvtColor
    import numpy as np

    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cv_gray = [cvtColor((r.permute(1, 2, 0).numpy() * 255).astype(np.float32), COLOR_RGB2GRAY) / 255 for r in rgb]
    given = torch.tensor(np.stack(cv_gray))[:, None]
    assert torch.allclose(grayscale_distance(rgb, given), torch.zeros(2), atol=1e-10)


def test_unknown_or_extractor_less_condition_is_a_clear_error():
    with pytest.raises(UserError, match="palette: no differentiable extractor"):
        check_differentiable("palette")
    with pytest.raises(UserError, match="--consistency_condition"):
        check_differentiable(None)


def test_preflight_refuses_a_reward_that_cannot_be_re_extracted(tiny_base, tiny_dataset, tmp_path):
    from zeroconv.train.preflight import preflight

    cfg = tiny_config(tiny_base, tiny_dataset, tmp_path / "run", consistency_loss_weight=1.0,
                      consistency_condition="blur", consistency_condition_options=["sigma=2", "sigma_max=6"])
    with pytest.raises(UserError, match="--consistency_condition_options sigma_max=6.0: a blur of random strength"):
        preflight(cfg)
    cfg.consistency_condition_options = ["sigma"]
    with pytest.raises(UserError, match="--consistency_condition_options 'sigma': expected KEY=VALUE"):
        preflight(cfg)


def _trainer(tiny_base, tiny_dataset, tmp_path, condition="canny", **flags):
    from accelerate.state import AcceleratorState

    from zeroconv.train.run import setup

    AcceleratorState._reset_state(reset_partial_state=True)
    return setup(tiny_config(tiny_base, tiny_dataset, tmp_path / "run", consistency_loss_weight=1.0,
                             consistency_condition=condition, **flags))


def _noisy(t, batch, timestep):
    latents = t.encoders.latents(batch, torch.Generator().manual_seed(0)).float()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long)
    return latents, noise, timesteps, t.noise_scheduler.add_noise(latents, noise, timesteps)


def test_reward_is_zero_for_a_perfect_reconstruction(tiny_base, tiny_dataset, tmp_path):
    from zeroconv.data.dataset import collate

    t = _trainer(tiny_base, tiny_dataset, tmp_path)
    batch = collate([t.dataset[i] for i in range(2)])
    latents, noise, timesteps, noisy = _noisy(t, batch, 100)
    with torch.no_grad():
        clean = t.base.family.predicted_clean(t.noise_scheduler, noisy, timesteps, noise)  # the true noise
        assert torch.allclose(clean, latents, atol=1e-4)
        truth = soft_edges(t.base.family.decode_latents(t.base, latents)).repeat(1, 3, 1, 1)
        perfect = t.consistency(t, noisy, timesteps, noise, truth)
        wrong = t.consistency(t, noisy, timesteps, noise, 1 - truth)
    assert float(perfect) < 1e-6 < 1e-2 < float(wrong)


def test_reward_gradient_reaches_only_the_controlnet_and_only_light_samples(tiny_base, tiny_dataset, tmp_path):
    from zeroconv.data.dataset import collate

    t = _trainer(tiny_base, tiny_dataset, tmp_path)
    batch = collate([t.dataset[i] for i in range(2)])
    from zeroconv.train.inputs import micro_conditioning

    cond = batch["conditioning_pixel_values"]
    prompts = t.encoders.prompts(batch)
    micro = micro_conditioning(batch, (None, None))
    for timestep, expect_grad in ((900, False), (150, True)):
        t.optimizer.zero_grad(set_to_none=True)
        _, _, timesteps, noisy = _noisy(t, batch, timestep)
        pred = t.base.family.denoise(t.unet, t.controlnet, noisy, timesteps, prompts, cond, micro)
        reward = t.consistency(t, noisy, timesteps, pred, cond)
        if not expect_grad:
            assert float(reward) == 0 and not reward.requires_grad  # above the threshold: no term at all
            continue
        reward.backward()
        grads = [p.grad for p in t.controlnet.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
        frozen = [*t.unet.parameters(), *t.base.vae.parameters(), *t.base.text_encoder.parameters()]
        assert all(p.grad is None for p in frozen)


def test_training_with_the_reward_runs_and_changes_the_loss(tiny_base, tiny_dataset, tmp_path):
    plain = tmp_path / "plain"
    assert run_training(tiny_config(tiny_base, tiny_dataset, plain, max_train_steps=3)) == 0
    rewarded = tmp_path / "rewarded"
    assert run_training(tiny_config(tiny_base, tiny_dataset, rewarded, max_train_steps=3, consistency_loss_weight=1.0,
                                    consistency_condition="canny", consistency_max_timestep=999)) == 0
    assert all(r > p for r, p in zip(losses(rewarded).values(), losses(plain).values()))  # the term is added


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    from tests.data.conditions.tiny_models import tiny_depth_model

    return tiny_depth_model(tmp_path_factory.mktemp("depth"))


def test_depth_reward_trains_with_its_model_frozen_and_its_gradient_reaches_only_the_controlnet(
        tiny_base, tiny_dataset, tmp_path, depth_model):
    from zeroconv.data.dataset import collate
    from zeroconv.train.inputs import micro_conditioning

    options = dict(consistency_condition_options=[f"model={depth_model}"])
    t = _trainer(tiny_base, tiny_dataset, tmp_path, condition="depth", **options)
    net = t.consistency.distance.net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert {(p.dtype, p.device) for p in net.parameters()} == {(t.weight_dtype, t.accelerator.device)}
    batch = collate([t.dataset[i] for i in range(2)])
    cond = batch["conditioning_pixel_values"]
    _, _, timesteps, noisy = _noisy(t, batch, 150)
    pred = t.base.family.denoise(t.unet, t.controlnet, noisy, timesteps, t.encoders.prompts(batch), cond,
                                 micro_conditioning(batch, (None, None)))
    reward = t.consistency(t, noisy, timesteps, pred, cond)
    assert float(reward.detach()) > 0
    reward.backward()
    grads = [p.grad for p in t.controlnet.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    frozen = [*t.unet.parameters(), *t.base.vae.parameters(), *t.base.text_encoder.parameters(), *net.parameters()]
    assert all(p.grad is None for p in frozen)

    plain = tmp_path / "plain"
    assert run_training(tiny_config(tiny_base, tiny_dataset, plain, max_train_steps=2)) == 0
    rewarded = tmp_path / "rewarded"
    assert run_training(tiny_config(tiny_base, tiny_dataset, rewarded, max_train_steps=2, consistency_loss_weight=1.0,
                                    consistency_condition="depth", consistency_max_timestep=999, **options)) == 0
    assert len(losses(rewarded)) == 2
    assert all(r > p for r, p in zip(losses(rewarded).values(), losses(plain).values()))  # the term is added
