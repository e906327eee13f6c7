"""Timestep densities and min-SNR weights (zeroconv.models.noise)."""

import math

import pytest
import torch

from zeroconv.models.noise import NoiseRecipe, draw_timesteps, min_snr_weights

T = 1000


def cubic_cdf(x: float) -> float:  # t = (1 - u^3) T, u ~ U(0, 1)
    return 1.0 - (1.0 - x / T) ** (1.0 / 3.0)


def logit_normal_cdf(x: float, mean: float, std: float) -> float:  # t = sigmoid(z) T, z ~ N(mean, std)
    p = min(max(x / T, 1e-12), 1 - 1e-12)
    return 0.5 * (1 + math.erf((math.log(p / (1 - p)) - mean) / (std * math.sqrt(2))))


@pytest.mark.parametrize("recipe, cdf", [
    (NoiseRecipe("uniform"), lambda x: x / T),
    (NoiseRecipe("cubic"), cubic_cdf),
    (NoiseRecipe("logit_normal"), lambda x: logit_normal_cdf(x, 0.0, 1.0)),
    (NoiseRecipe("logit_normal", logit_mean=1.0, logit_std=0.5), lambda x: logit_normal_cdf(x, 1.0, 0.5)),
])
def test_timestep_density_matches_its_formula(recipe, cdf):
    n = 200_000
    t = draw_timesteps(recipe, n, T, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    # Kolmogorov-Smirnov distance at every integer t: P(draw <= k) vs the formula's P(t < k + 1)
    counts = torch.bincount(t, minlength=T).double().cumsum(0) / n
    expected = torch.tensor([cdf(k + 1) for k in range(T)], dtype=torch.float64)
    distance = float((counts - expected).abs().max())
    assert distance < 0.005, distance  # 1.36/sqrt(n) = 0.003 is the 95% bound; a wrong density is off by >0.05


def test_cubic_is_biased_to_high_noise_and_uniform_keeps_the_textbook_draws():
    cubic = draw_timesteps(NoiseRecipe("cubic"), 100_000, T, torch.Generator().manual_seed(0), "cpu")
    assert float((cubic >= 875).double().mean()) == pytest.approx(0.5, abs=0.01)
    uniform = draw_timesteps(NoiseRecipe(), 16, T, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(uniform, torch.randint(0, T, (16,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_diffusers_training_scripts(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", prediction_type=prediction_type)
    timesteps = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    gamma = 5.0
    # as in diffusers' examples (train_text_to_image.py): stack with gamma, min, divide by snr (+1 for v)
    snr = compute_snr(scheduler, timesteps)
    expected = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    expected = expected / (snr + 1) if prediction_type == "v_prediction" else expected / snr
    weights = min_snr_weights(scheduler, timesteps, gamma)
    assert torch.allclose(weights, expected, rtol=1e-6, atol=0)
    assert float(weights[0]) < 0.01 and float(weights[-1]) == pytest.approx(1.0 if prediction_type == "epsilon"
                                                                           else float(snr[-1] / (snr[-1] + 1)))


def test_an_unset_density_is_the_ddpm_default_uniform():
    from zeroconv.config import TrainConfig
    from zeroconv.train.setup import noise_recipe

    cfg = TrainConfig()
    assert cfg.timestep_sampling is None  # unset: the family decides (SD3 draws by --weighting_scheme)
    unset = noise_recipe(cfg, 800)
    for step in (0, 199, 200, 799):  # the paper's draws, the textbook's torch.randint, at every step
        drawn = draw_timesteps(unset.at_step(step), 64, T, torch.Generator().manual_seed(5), "cpu")
        assert torch.equal(drawn, torch.randint(0, T, (64,), generator=torch.Generator().manual_seed(5))), step


def test_cubic_then_uniform_draws_cubic_before_the_switch_and_uniform_after():
    curriculum = NoiseRecipe("cubic_then_uniform", switch_step=3)
    generator = torch.Generator().manual_seed(11)
    drawn = [draw_timesteps(curriculum.at_step(step), 8, T, generator, "cpu") for step in range(6)]
    # the same generator, density by density: three cubic batches, then uniform ones
    reference = torch.Generator().manual_seed(11)
    expected = [draw_timesteps(NoiseRecipe("cubic"), 8, T, reference, "cpu") for _ in range(3)]
    expected += [draw_timesteps(NoiseRecipe("uniform"), 8, T, reference, "cpu") for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    # and the densities themselves: most draws above 0.875 T only before the switch
    many = NoiseRecipe("cubic_then_uniform", switch_step=1)
    before = draw_timesteps(many.at_step(0), 50_000, T, torch.Generator().manual_seed(0), "cpu")
    after = draw_timesteps(many.at_step(1), 50_000, T, torch.Generator().manual_seed(0), "cpu")
    assert float((before >= 875).double().mean()) == pytest.approx(0.5, abs=0.01)
    assert float((after >= 875).double().mean()) == pytest.approx(0.125, abs=0.01)


def test_the_switch_is_the_fraction_of_the_run():
    from zeroconv.config import TrainConfig
    from zeroconv.train.setup import noise_recipe

    cfg = TrainConfig(timestep_sampling="cubic_then_uniform", timestep_switch_fraction=0.25)
    assert noise_recipe(cfg, 800).switch_step == 200
    assert noise_recipe(cfg, 10).switch_step == 2  # rounded: 2.5 -> 2 steps cubic


def test_a_switch_fraction_outside_0_1_is_refused():
    from zeroconv.config import TrainConfig, check_train_config
    from zeroconv.errors import UserError

    with pytest.raises(UserError, match="--timestep_switch_fraction"):
        check_train_config(TrainConfig(pretrained_model_name_or_path="toy", train_data_dir="d",
                                       timestep_switch_fraction=1.5))
