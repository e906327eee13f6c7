"""The Flux family (issue 15) on the tiny Flux base: detection, the prompt encodings FluxPipeline makes, packing,
an untrained ControlNet that changes nothing, the guidance embedding, and FluxControlNetPipeline."""

import json

import pytest
import torch

from zeroconv.errors import UserError
from zeroconv.models.base import load_base
from zeroconv.models.families import detect
from zeroconv.models.families.flux import pack, unpack


@pytest.fixture(scope="module")
def flux(tiny_flux_base):
    return load_base(str(tiny_flux_base))


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    from zeroconv.testing import make_tiny_flux_base

    return load_base(str(make_tiny_flux_base(tmp_path_factory.mktemp("flux_dev"), guidance_embeds=True)))


def test_flux_is_detected_and_keeps_the_scripts_t5_length(flux, tiny_flux_base, tmp_path):
    assert json.loads((tiny_flux_base / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert detect(str(tiny_flux_base)).name == "flux"
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text((tiny_flux_base / "transformer" / "config.json").read_text())
    assert detect(str(tmp_path)).name == "flux"  # no model_index.json: the transformer's class says it
    assert flux.max_sequence_length == 512  # FluxPipeline.encode_prompt's, which train_controlnet_flux.py keeps
    assert type(flux.unet).__name__ == "FluxTransformer2DModel"


def test_prompt_encodings_are_the_flux_pipelines(flux):
    pipe = flux.family.pipeline(flux)
    captions = ["a red square", "a photo of a blue circle"]
    want, want_pooled, text_ids = pipe.encode_prompt(captions, prompt_2=captions, device="cpu",
                                                     max_sequence_length=flux.max_sequence_length)
    ours = flux.family.encode_prompts(flux, captions, "cpu")
    assert set(ours) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert torch.equal(ours["prompt_embeds"], want) and torch.equal(ours["pooled_prompt_embeds"], want_pooled)
    assert {k: tuple(v.shape[1:]) for k, v in ours.items()} == flux.family.prompt_shape(flux) == {
        "prompt_embeds": (512, 64), "pooled_prompt_embeds": (32,)}
    assert not text_ids.any()  # the text ids are zeros, which denoise builds itself


def test_pack_is_fluxs_and_unpack_inverts_it():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert pack(latents).shape == (2, 4 * 3, 64)
    assert torch.equal(unpack(pack(latents), 8, 6), latents)


@pytest.mark.parametrize("base", ["flux", "flux_dev"])
def test_untrained_controlnet_leaves_the_transformer_bit_identical(base, request):
    from diffusers import FluxPipeline

    base = request.getfixturevalue(base)
    family = base.family
    controlnet = family.build_controlnet(base, num_double_layers=1, num_single_layers=2)
    assert (controlnet.config.num_layers, controlnet.config.num_single_layers) == (1, 2)
    assert controlnet.config.guidance_embeds == base.unet.config.guidance_embeds
    prompts = family.encode_prompts(base, ["a red square", ""], "cpu")
    x, t, cond = torch.randn(2, 16, 8, 8), torch.tensor([700.0, 30.0]), torch.randn(2, 16, 8, 8)
    guidance = torch.full((2,), 3.5) if base.unet.config.guidance_embeds else None
    with torch.no_grad():
        joined = family.denoise(base.unet, controlnet, x, t, prompts, cond, guidance=3.5)
        alone = base.unet(hidden_states=pack(x), timestep=t / 1000, encoder_hidden_states=prompts["prompt_embeds"],
                          pooled_projections=prompts["pooled_prompt_embeds"], txt_ids=torch.zeros(512, 3),
                          img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                          guidance=guidance, return_dict=False)[0]
        assert torch.equal(joined, unpack(alone, 8, 8))
        # no ControlNet: the transformer alone (how zeroconv.models.toy_flow pretrains one)
        assert torch.equal(family.denoise(base.unet, None, x, t, prompts, None, guidance=3.5), joined)
        if guidance is not None:  # the guidance embedding is read: another value, another prediction
            assert not torch.equal(family.denoise(base.unet, controlnet, x, t, prompts, cond, guidance=1.0), joined)


def test_controlnet_options_are_checked(flux):
    with pytest.raises(UserError, match="--num_double_layers 3: this base's transformer has 2"):
        flux.family.build_controlnet(flux, num_double_layers=3)
    with pytest.raises(UserError, match="--conditioning_channels 1"):
        flux.family.build_controlnet(flux, conditioning_channels=1)
    with pytest.raises(UserError, match="--only_mid_control"):
        flux.family.denoise(flux.unet, None, torch.zeros(1, 16, 8, 8), torch.zeros(1), {}, None,
                            only_mid_control=True)


def test_pipeline_is_the_flux_controlnet_pipeline_and_makes_an_image(flux):
    import numpy as np
    from PIL import Image

    pipe = flux.family.pipeline(flux, flux.family.build_controlnet(flux, num_double_layers=1, num_single_layers=1))
    assert type(pipe).__name__ == "FluxControlNetPipeline"
    image = pipe("a red square", image=Image.new("RGB", (64, 64), "white"), num_inference_steps=2,
                 guidance_scale=3.5, generator=torch.Generator().manual_seed(0), height=64, width=64).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    assert type(flux.family.pipeline(flux)).__name__ == "FluxPipeline"
