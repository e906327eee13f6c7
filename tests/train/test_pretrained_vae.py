"""--pretrained_vae_model_name_or_path (diffusers' train_controlnet_sdxl.py flag): the run encodes with that VAE,
and the latent cache's key and the resume identity change with it."""

import pytest
import torch

from tests.train.helpers import losses, run_training, tiny_config


@pytest.fixture
def other_vae(tiny_base, tmp_path):
    """The tiny base's VAE with other encoder weights, saved on its own (config.json + weights, no vae/ folder)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.startswith("encoder."):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_training_encodes_with_the_given_vae(tiny_base, tiny_dataset, other_vae, tmp_path):
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import AutoencoderKL

    from zeroconv.train.loop import train_loop
    from zeroconv.train.run import setup

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    t = setup(tiny_config(tiny_base, tiny_dataset, tmp_path / "with", max_train_steps=1,
                          pretrained_vae_model_name_or_path=str(other_vae)))
    saved = AutoencoderKL.from_pretrained(other_vae).state_dict()
    used = t.encoders.vae.state_dict()
    assert t.encoders.vae is t.base.vae and all(torch.equal(used[k], saved[k]) for k in saved)
    assert train_loop(t) == 0
    t.accelerator.end_training()
    assert run_training(tiny_config(tiny_base, tiny_dataset, tmp_path / "without", max_train_steps=1)) == 0
    # same seed, same batch, same noise: only the latents differ
    assert losses(tmp_path / "with")[1] != losses(tmp_path / "without")[1]


def test_the_vae_is_part_of_the_cache_key_and_the_run_identity(tiny_base, tiny_dataset, other_vae, tmp_path):
    from zeroconv.data.cache import base_identity, cache_key
    from zeroconv.errors import UserError
    from zeroconv.models.base import load_base

    base = load_base(str(tiny_base))
    plain = base_identity(str(tiny_base), None, base)
    with_vae = base_identity(str(tiny_base), None, load_base(str(tiny_base), vae=str(other_vae)), str(other_vae))
    assert with_vae["vae"] == str(other_vae.resolve()) and with_vae["vae_files"]
    assert cache_key(plain) != cache_key(with_vae)

    out = tmp_path / "run"
    assert run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=1, checkpointing_steps=1,
                                    pretrained_vae_model_name_or_path=str(other_vae))) == 0
    with pytest.raises(UserError, match=r"different run \(vae: checkpoint .*vae' vs now None"):
        run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=2, resume_from_checkpoint="latest"))


def test_a_folder_without_a_vae_is_a_user_error_naming_the_flag(tmp_path):
    from zeroconv.errors import UserError
    from zeroconv.models.base import load_vae

    with pytest.raises(UserError, match=r"--pretrained_vae_model_name_or_path .*: no VAE could be loaded there"):
        load_vae(str(tmp_path))
