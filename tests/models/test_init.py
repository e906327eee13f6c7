"""zeroconv init: the same initial ControlNet from a base in diffusers layout or as one original-layout file."""

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from zeroconv import cli
from zeroconv.export import import_original
from zeroconv.models import formats
from zeroconv.models.single_file import read_checkpoint, save_sd_single_file


def assert_same_weights(folder_a, folder_b):
    a = ControlNetModel.from_pretrained(folder_a).state_dict()
    b = ControlNetModel.from_pretrained(folder_b).state_dict()
    assert set(a) == set(b)
    differing = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differing, differing[:5]


@pytest.mark.parametrize("base_fixture", ["tiny_base", "tiny_base_v"])
def test_init_from_single_file_equals_init_from_diffusers_folder(base_fixture, request, tmp_path):
    base = request.getfixturevalue(base_fixture)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    single = save_sd_single_file(tmp_path / "base.safetensors", pipe.unet, pipe.vae, pipe.text_encoder,
                                 pipe.scheduler.config.prediction_type)
    assert cli.main(["init", "--base", str(base), "--out", str(tmp_path / "from_folder")]) == 0
    assert cli.main(["init", "--base", str(single), "--out", str(tmp_path / "from_file")]) == 0
    assert_same_weights(tmp_path / "from_folder", tmp_path / "from_file")
    controlnet = ControlNetModel.from_pretrained(tmp_path / "from_file")
    assert torch.equal(controlnet.conv_in.weight, pipe.unet.conv_in.weight)  # the encoder is the base's copy
    assert all(block.weight.abs().max() == 0 for block in controlnet.controlnet_down_blocks)  # zero convs


def test_init_from_ckpt_without_metadata_equals_init_from_folder(tmp_path):
    """A community .ckpt: configs inferred from shapes (SD-like widths), weights through diffusers' converter."""
    from zeroconv.testing import make_tiny_base

    base = make_tiny_base(tmp_path / "base")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    unet.save_pretrained(base / "unet")
    pipe = StableDiffusionPipeline.from_pretrained(base)
    torch.save({"state_dict": formats.sd_to_original(pipe.unet, pipe.vae, pipe.text_encoder)}, tmp_path / "base.ckpt")
    assert cli.main(["init", "--base", str(base), "--out", str(tmp_path / "from_folder")]) == 0
    assert cli.main(["init", "--base", str(tmp_path / "base.ckpt"), "--out", str(tmp_path / "from_ckpt")]) == 0
    assert_same_weights(tmp_path / "from_folder", tmp_path / "from_ckpt")


def test_combined_file_holds_base_and_control_model(tiny_base, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    single = save_sd_single_file(tmp_path / "base.safetensors", pipe.unet, pipe.vae, pipe.text_encoder)
    for source, name in ((str(tiny_base), "folder"), (str(single), "file")):
        combined = tmp_path / f"combined_{name}.safetensors"
        assert cli.main(["init", "--base", source, "--out", str(tmp_path / name), "--combined", str(combined)]) == 0
        checkpoint, _ = read_checkpoint(combined)
        base_checkpoint, _ = read_checkpoint(single)
        assert all(torch.equal(checkpoint[key], value) for key, value in base_checkpoint.items())
        assert "control_model.input_hint_block.14.weight" in checkpoint
        assert_same_weights(tmp_path / name, import_original(combined, tmp_path / f"imported_{name}"))


def test_init_user_errors(tmp_path, capsys):
    assert cli.main(["init", "--base", "someone/some-model", "--out", str(tmp_path / "o")]) == 2
    assert "offline" in capsys.readouterr().err
    assert cli.main(["init", "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "not_sd.safetensors"))
    assert cli.main(["init", "--base", str(tmp_path / "not_sd.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "match no model family" in capsys.readouterr().err
    assert cli.main(["init", "--base", str(tmp_path / "empty.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
