"""The SD3 family (issue 15) on the tiny SD3 base: detection, the prompt encodings diffusers' pipeline makes (with
and without T5), an untrained ControlNet that changes nothing, the flow-matching step against the SD3 script's
math for every --weighting_scheme, and sampling."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.errors import UserError
from zeroconv.models.base import load_base
from zeroconv.models.families import detect
from zeroconv.models.noise import NoiseRecipe

SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@pytest.fixture(scope="module")
def sd3(tiny_sd3_base):
    return load_base(str(tiny_sd3_base))


def test_sd3_is_detected_from_its_folder_transformer_and_single_file_keys(tiny_sd3_base, tmp_path):
    assert json.loads((tiny_sd3_base / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert detect(str(tiny_sd3_base)).name == "sd3"
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text((tiny_sd3_base / "transformer" / "config.json").read_text())
    assert detect(str(tmp_path)).name == "sd3"  # no model_index.json: the transformer's class says it
    single = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)}, str(single))
    assert detect(str(single)).name == "sd3"
    with pytest.raises(UserError, match=r"an SD3 single file.*diffusers folder"):
        load_base(str(single))


@pytest.mark.parametrize("with_t5", [True, False])
def test_prompt_encodings_are_the_sd3_pipelines(with_t5, tiny_sd3_base, tiny_sd3_base_without_t5):
    from diffusers import StableDiffusion3Pipeline

    folder = tiny_sd3_base if with_t5 else tiny_sd3_base_without_t5
    base = load_base(str(folder))
    assert (base.text_encoder_3 is not None) == with_t5
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **({} if with_t5 else
                                                               {"text_encoder_3": None, "tokenizer_3": None}))
    captions = ["a red square", "a photo of a blue circle"]
    # both without autograd: T5's attention takes another CPU kernel (1e-6 apart) when its weights want gradients
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(captions, captions, captions, device="cpu",
                                                     do_classifier_free_guidance=False, max_sequence_length=77)
        ours = base.family.encode_prompts(base, captions, "cpu")
    assert ours["prompt_embeds"].shape == (2, 77 + 77, 64) and ours["pooled_prompt_embeds"].shape == (2, 64)
    torch.testing.assert_close(ours["prompt_embeds"], want, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], want_pooled, rtol=0, atol=0)
    assert {k: tuple(v.shape[1:]) for k, v in ours.items()} == base.family.prompt_shape(base)
    t5_part = ours["prompt_embeds"][:, 77:]
    assert t5_part.abs().sum() > 0 if with_t5 else torch.equal(t5_part, torch.zeros_like(t5_part))
    base.max_sequence_length = 5  # --max_sequence_length: the T5 part's length
    assert base.family.encode_prompts(base, captions, "cpu")["prompt_embeds"].shape == (2, 77 + 5, 64)


def test_untrained_controlnet_leaves_the_transformer_output_bit_identical(sd3):
    family = sd3.family
    controlnet = family.build_controlnet(sd3, num_layers=1)
    assert controlnet.config.num_layers == 1 and len(controlnet.transformer_blocks) == 1
    assert torch.equal(controlnet.transformer_blocks[0].attn.to_q.weight, sd3.unet.transformer_blocks[0].attn.to_q.weight)
    # diffusers' default of 12 needs a deeper base than the tiny one's 2 blocks: the message says what fits
    with pytest.raises(UserError, match=r"--num_layers 12: this base's transformer has 2 joint blocks.*--num_layers 1"):
        family.build_controlnet(sd3)
    torch.manual_seed(0)
    noisy, timesteps = torch.randn(2, 16, 8, 8), torch.tensor([250.0, 900.0])
    prompts = family.encode_prompts(sd3, ["a red square", ""], "cpu")
    condition = family.encode_condition(sd3, torch.rand(2, 3, 64, 64), torch.Generator().manual_seed(1))
    assert condition.shape == (2, 16, 8, 8)
    with torch.no_grad():
        joined = family.denoise(sd3.unet, controlnet, noisy, timesteps, prompts, condition)
        alone = sd3.unet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompts["prompt_embeds"],
                         pooled_projections=prompts["pooled_prompt_embeds"], return_dict=False)[0]
        residuals = controlnet(hidden_states=noisy, controlnet_cond=condition, timestep=timesteps,
                               encoder_hidden_states=prompts["prompt_embeds"],
                               pooled_projections=prompts["pooled_prompt_embeds"], return_dict=False)[0]
    assert torch.equal(joined, alone)
    with torch.no_grad():  # no ControlNet: the transformer alone (how zeroconv.models.toy_flow pretrains one)
        assert torch.equal(family.denoise(sd3.unet, None, noisy, timesteps, prompts, None), alone)
    assert len(residuals) == 1 and all(torch.equal(r, torch.zeros_like(r)) for r in residuals)
    with torch.no_grad():  # a trained one does reach the transformer
        controlnet.controlnet_blocks[0].weight.normal_()
        moved = family.denoise(sd3.unet, controlnet, noisy, timesteps, prompts, condition)
    assert not torch.equal(moved, alone)


def test_condition_is_the_vae_latents_of_the_pixels_in_minus_one_to_one(sd3):
    pixels = torch.rand(1, 3, 64, 64)
    got = sd3.family.encode_condition(sd3, pixels, torch.Generator().manual_seed(3))
    vae = sd3.vae
    with torch.no_grad():
        posterior = vae.encode(pixels * 2 - 1).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    want = (posterior.mean + posterior.std * noise - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def script_step(scheduler, latents, pred, generator, scheme, precondition, mode_scale=1.29):
    """diffusers' train_controlnet_sd3.py's noise, sigmas, weighting and loss, with a given generator."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    noise = torch.randn(latents.shape, generator=generator)
    u = compute_density_for_timestep_sampling(scheme, latents.shape[0], 0.0, 1.0, mode_scale, generator=generator)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # the script's get_sigmas
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    model_pred = pred * (-sigmas) + noisy if precondition else pred
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = latents if precondition else noise - latents
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(len(latents), -1), 1)
    return noisy, timesteps, sigmas, loss.mean()


@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_flow_matching_step_equals_the_sd3_scripts(sd3, scheme, precondition):
    scheduler = sd3.noise_scheduler
    latents, pred = torch.randn(6, 16, 8, 8), torch.randn(6, 16, 8, 8)
    recipe = NoiseRecipe(weighting_scheme=scheme, precondition_outputs=precondition)
    noisy, timesteps, target, weights = sd3.family.noisy_batch(scheduler, latents, torch.Generator().manual_seed(5),
                                                               recipe)
    want_noisy, want_timesteps, sigmas, want_loss = script_step(scheduler, latents, pred,
                                                                torch.Generator().manual_seed(5), scheme, precondition)
    assert torch.equal(timesteps, want_timesteps) and torch.equal(noisy, want_noisy)
    # zeroconv's loss (train/loop.compute_loss): per-sample mean squared error times the family's weights
    loss = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    sigma = sigmas.flatten()
    plain = {"sigma_sqrt": sigma ** -2.0, "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}.get(
        scheme, torch.ones_like(sigma))
    torch.testing.assert_close(weights, plain * (sigma ** 2 if precondition else 1), rtol=1e-6, atol=0)
    # the consistency reward's one-step estimate inverts the noising for the exact velocity
    clean = sd3.family.predicted_clean(scheduler, noisy, timesteps, target)
    torch.testing.assert_close(clean, latents, rtol=0, atol=1e-5)


def test_flow_matching_densities_are_diffusers(sd3):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from zeroconv.models.noise import draw_flow_indices

    for scheme in SCHEMES:
        recipe = NoiseRecipe(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.7, mode_scale=0.5)
        got = draw_flow_indices(recipe, 4000, 1000, torch.Generator().manual_seed(9), "cpu")
        u = compute_density_for_timestep_sampling(scheme, 4000, 0.3, 0.7, 0.5, generator=torch.Generator().manual_seed(9))
        assert torch.equal(got, (u * 1000).long())
    # logit_normal at mean 0 sits in the middle of the schedule; uniform spreads evenly
    middle = draw_flow_indices(NoiseRecipe(), 4000, 1000, torch.Generator().manual_seed(0), "cpu").float()
    assert abs(middle.median().item() - 500) < 25 and middle.std().item() < 250
    uniform = draw_flow_indices(NoiseRecipe(weighting_scheme="none"), 4000, 1000, torch.Generator().manual_seed(0),
                                "cpu").float()
    assert abs(uniform.std().item() - 1000 / math.sqrt(12)) < 15


def test_flags_that_do_not_apply_to_sd3_name_themselves(sd3):
    family = sd3.family
    with pytest.raises(UserError, match="--only_mid_control"):
        family.denoise(sd3.unet, None, None, None, {"prompt_embeds": None, "pooled_prompt_embeds": None}, None,
                       only_mid_control=True)
    with pytest.raises(UserError, match="--conditioning_channels 1"):
        family.build_controlnet(sd3, 1)
    with pytest.raises(UserError, match="--timestep_sampling"):
        family.noisy_batch(sd3.noise_scheduler, torch.zeros(1, 16, 8, 8), torch.Generator(),
                           NoiseRecipe(timestep_sampling="cubic"))
    with pytest.raises(UserError, match="--num_extra_conditioning_channels"):
        family.build_controlnet(sd3, num_layers=1, num_extra_conditioning_channels=1)
    # zeroconv's default init (unit_variance) is SD's: unset builds SD3's only one, asking for it names the flag
    with pytest.raises(UserError, match="--condition_encoder_init unit_variance"):
        family.build_controlnet(sd3, num_layers=1, condition_encoder_init="unit_variance")


def test_pipeline_is_the_sd3_controlnet_pipeline_and_makes_an_image(sd3):
    import numpy as np

    pipe = sd3.family.pipeline(sd3, sd3.family.build_controlnet(sd3, num_layers=1))
    assert type(pipe).__name__ == "StableDiffusion3ControlNetPipeline"
    image = pipe("a red square", image=torch.rand(1, 3, 64, 64), num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    assert type(sd3.family.pipeline(sd3)).__name__ == "StableDiffusion3Pipeline"
