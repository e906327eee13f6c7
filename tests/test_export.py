"""export/import/push: bit-identical round trip, diffusers reads our files, only shareable files are pushed."""

import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors import safe_open

from zeroconv import cli
from zeroconv.errors import UserError
from zeroconv.export import (check_push_possible, export_diffusers, export_original, files_to_push,
                             import_original)
from zeroconv.models import formats
from zeroconv.models.single_file import load_sd_single_file, read_checkpoint

from tests.models.test_formats import sd_shaped_controlnet


def config_without_private(config) -> dict:
    """The config as its config.json holds it (tuples become lists), without diffusers' bookkeeping keys."""
    return json.loads(json.dumps({key: value for key, value in dict(config).items() if not key.startswith("_")}))


def saved(controlnet, folder):
    controlnet.save_pretrained(folder)
    return folder


def random_weights(model, seed=1):
    """Non-zero everywhere, so zero convs do not hide a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("flavor", ["sd15", "sd21"])
def test_round_trip_is_bit_identical_with_same_config(flavor, tmp_path):
    controlnet = random_weights(sd_shaped_controlnet(flavor))
    model = saved(controlnet, tmp_path / "model")
    file = export_original(model, tmp_path / "cn.safetensors")
    with safe_open(str(file), "pt") as handle:
        keys = list(handle.keys())
        assert json.loads(handle.metadata()["zeroconv.controlnet_config"])["block_out_channels"] == [32, 64, 64, 64]
    assert all(key.startswith("control_model.") for key in keys)
    back = ControlNetModel.from_pretrained(import_original(file, tmp_path / "back"))
    assert config_without_private(back.config) == config_without_private(controlnet.config)
    expected = controlnet.state_dict()
    got = back.state_dict()
    assert set(got) == set(expected)
    assert all(got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]) for key in expected)


def test_fp16_export_and_unprefixed_layout(tmp_path):
    controlnet = random_weights(sd_shaped_controlnet("sd15"))
    file = export_original(saved(controlnet, tmp_path / "model"), tmp_path / "cn.safetensors", torch.float16, prefix="")
    checkpoint, _ = read_checkpoint(file)
    assert "input_hint_block.0.weight" in checkpoint and checkpoint["time_embed.0.weight"].dtype == torch.float16
    back = ControlNetModel.from_pretrained(import_original(file, tmp_path / "back"))
    assert all(torch.equal(value, controlnet.state_dict()[key].half()) for key, value in back.state_dict().items())


def in_fresh_memory(model):
    """Parameters copied to newly allocated memory. from_single_file leaves them inside the file's memory map at
    offsets that are not 64-byte aligned, and CPU kernels then round differently (up to ~5e-6 on outputs of
    magnitude ~10 here) with bit-identical weights; aligned, the two models agree exactly."""
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    return model.eval()


@pytest.mark.parametrize("flavor", ["sd15", "sd21"])
def test_diffusers_from_single_file_loads_export_with_same_outputs(flavor, tmp_path):
    model = saved(random_weights(sd_shaped_controlnet(flavor)), tmp_path / "model")
    file = export_original(model, tmp_path / "cn.safetensors")
    controlnet = in_fresh_memory(ControlNetModel.from_pretrained(model).eval())
    loaded = in_fresh_memory(ControlNetModel.from_single_file(str(file), config=str(model), local_files_only=True))
    generator = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=generator), timestep=torch.tensor([321]),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=generator),
                  controlnet_cond=torch.rand(1, 3, 64, 64, generator=generator), return_dict=False)
    with torch.no_grad():
        down_expected, mid_expected = controlnet(**inputs)
        down_got, mid_got = loaded(**inputs)
    assert len(down_got) == len(down_expected) == 12
    worst = max((got - expected).abs().max().item()
                for got, expected in zip([*down_got, mid_got], [*down_expected, mid_expected]))
    assert worst <= 1e-6
    assert mid_expected.abs().max() > 0  # the comparison compared something


def test_import_infers_config_of_a_file_without_metadata(tmp_path):
    from safetensors.torch import save_file

    controlnet = random_weights(sd_shaped_controlnet("sd21"))
    state = formats.controlnet_to_original(controlnet.state_dict(), controlnet.config)
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "community.safetensors"))
    back = ControlNetModel.from_pretrained(import_original(tmp_path / "community.safetensors", tmp_path / "back"))
    assert all(torch.equal(back.state_dict()[key], value) for key, value in controlnet.state_dict().items())
    with pytest.raises(UserError, match="not an original-layout ControlNet"):
        import_original(_unet_file(tmp_path), tmp_path / "x")


def _unet_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "not_control.safetensors"))
    return tmp_path / "not_control.safetensors"


def test_export_cli_of_a_decoder_run_writes_full_sd_file(tiny_base, tmp_path, capsys):
    """A --sd_locked false run: ControlNet file, plus trained UNet + base VAE/text encoder + control in one."""
    from zeroconv.models.controlnet import build_controlnet

    run = tmp_path / "run"
    unet = random_weights(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet"), seed=3)
    controlnet = random_weights(build_controlnet(unet, 8))
    controlnet.save_pretrained(run)
    unet.save_pretrained(run / "unet_decoder")
    (run / "config.yaml").write_text(f"pretrained_model_name_or_path: {tiny_base}\n")
    assert cli.main(["export", str(run), "--dtype", "fp32"]) == 0
    combined = run / "run-fp32-sd.safetensors"
    parts = load_sd_single_file(combined, components=("unet",))
    assert all(torch.equal(parts["unet"].state_dict()[key], value) for key, value in unet.state_dict().items())
    back = ControlNetModel.from_pretrained(import_original(combined, tmp_path / "back"))
    assert all(torch.equal(back.state_dict()[key], value) for key, value in controlnet.state_dict().items())
    assert "run-fp32.safetensors" in (run / "README.md").read_text()

    out = tmp_path / "fp16"
    assert cli.main(["export", str(run), "--format", "diffusers", "--dtype", "fp16", "--out", str(out)]) == 0
    for folder, model_class in ((out, ControlNetModel), (out / "unet_decoder", UNet2DConditionModel)):
        stored, _ = read_checkpoint(folder / "diffusion_pytorch_model.safetensors")
        assert {value.dtype for value in stored.values()} == {torch.float16}
        reloaded = model_class.from_pretrained(folder, torch_dtype=torch.float16)
        assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in stored.items())


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "checkpoint-10").mkdir()
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "checkpoint-" in capsys.readouterr().err
    assert cli.main(["import", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2


def test_push_selects_model_card_and_grids_never_checkpoints(tmp_path):
    run = tmp_path / "run"
    for name in ["config.json", "diffusion_pytorch_model.safetensors", "README.md", "config.yaml",
                 "run-fp16.safetensors", "validation/step-000100.png", "unet_decoder/config.json",
                 "unet_decoder/diffusion_pytorch_model.safetensors", "checkpoint-100/controlnet/config.json",
                 "checkpoint-100/optimizer.bin", "checkpoint-100/random_states_0.pkl", "checkpoint-100/grid.png",
                 "logs/train/events.out.tfevents.1", "cache/latents.safetensors", "validation/state.json"]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    assert files_to_push(run) == ["README.md", "config.json", "config.yaml", "diffusion_pytorch_model.safetensors",
                                  "run-fp16.safetensors", "unet_decoder/config.json",
                                  "unet_decoder/diffusion_pytorch_model.safetensors", "validation/step-000100.png"]


def test_push_fails_at_start_offline_or_without_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        check_push_possible("user/controlnet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UserError, match="no token"):
        check_push_possible("user/controlnet")
    with pytest.raises(UserError, match="not valid"):
        check_push_possible("bad//id")
    assert cli.main(["push", str(tmp_path), "--repo", "user/controlnet"]) == 2
