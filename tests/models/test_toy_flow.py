"""The toy SD3 and Flux bases (zeroconv.models.toy_flow), built with a few steps: each loads as its family from
its diffusers folder, and its VAE's shift and scale standardize the toy images' latents as SD3's convention asks.
bench/control_learned.py builds them at full length and trains ControlNets on them (bench/RESULTS.md)."""

import json

import pytest
import torch

from zeroconv.models.base import load_base
from zeroconv.models.toy_base import draw_training_set, encode_all
from zeroconv.models.toy_flow import make_toy_flow_base


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_toy_flow_base_is_its_family_with_standardized_latents(family, tmp_path):
    out = make_toy_flow_base(tmp_path / family, family, steps=2, batch_size=2, num_images=32)
    base = load_base(str(out))
    assert base.family.name == family
    assert base.unet.config.in_channels == {"sd3": 4, "flux": 16}[family]  # Flux packs the 4 channels 2x2
    config = base.vae.config
    means, _ = encode_all(base.vae, draw_training_set(32, seed=0)[0])
    latents = (means - config.shift_factor) * config.scaling_factor
    assert abs(latents.mean().item()) < 1e-4 and abs(latents.std().item() - 1) < 1e-4
    assert json.loads((out / "toy_flow.json").read_text())["steps"] == 2
    # the frozen text encoders tell captions apart (Flux's T5 is random, its CLIP the toy's trained one)
    prompts = base.family.encode_prompts(base, ["red circle with navy background", "blue square with red background"],
                                         "cpu")
    assert all(not torch.allclose(value[0], value[1]) for value in prompts.values())
