"""Key layouts: zeroconv's diffusers -> original mapping is read back exactly by diffusers' own converters."""

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

from zeroconv.models import formats
from zeroconv.models.single_file import load_sd_single_file, read_checkpoint, save_sd_single_file


def sd_shaped_controlnet(flavor: str, seed: int = 0) -> ControlNetModel:
    """SD's structure at small width: four levels, two layers each, cross attention, 8x condition encoder;
    SD 2.x's linear projections and per-level head counts for 'sd21'."""
    torch.manual_seed(seed)
    sd21 = flavor == "sd21"
    return ControlNetModel(block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32,
                           norm_num_groups=8, attention_head_dim=(2, 4, 4, 4) if sd21 else 4,
                           use_linear_projection=sd21, conditioning_embedding_out_channels=(16, 32, 96, 256))


@pytest.mark.parametrize("flavor", ["sd15", "sd21"])
def test_controlnet_original_keys_are_read_back_by_diffusers(flavor):
    controlnet = sd_shaped_controlnet(flavor)
    state = controlnet.state_dict()
    original = formats.controlnet_to_original(state, controlnet.config, prefix=formats.CONTROL_PREFIX)
    assert {"control_model.time_embed.0.weight", "control_model.input_blocks.3.0.op.weight",
            "control_model.zero_convs.11.0.weight", "control_model.middle_block_out.0.bias",
            "control_model.input_hint_block.14.weight", "control_model.middle_block.1.proj_in.weight",
            "control_model.input_blocks.4.0.skip_connection.weight"} <= set(original)
    by_diffusers = convert_controlnet_checkpoint(original, controlnet.config)
    assert set(by_diffusers) == set(state)
    assert all(torch.equal(by_diffusers[key], state[key]) for key in state)
    inverse = formats.controlnet_from_original(original, dict(controlnet.config), prefix=formats.CONTROL_PREFIX)
    assert all(inverse[key] is state[key] for key in state)


def test_sdxl_add_embedding_maps_to_label_emb():
    torch.manual_seed(0)
    controlnet = ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                 norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 addition_embed_type="text_time", addition_time_embed_dim=8,
                                 projection_class_embeddings_input_dim=8 * 6 + 32,
                                 transformer_layers_per_block=(1, 2))
    original = formats.controlnet_to_original(controlnet.state_dict(), controlnet.config)
    assert torch.equal(original["label_emb.0.0.weight"], controlnet.add_embedding.linear_1.weight)
    assert torch.equal(original["label_emb.0.2.bias"], controlnet.add_embedding.linear_2.bias)
    config = formats.infer_controlnet_config(original)
    assert config["addition_embed_type"] == "text_time"
    assert config["projection_class_embeddings_input_dim"] == 8 * 6 + 32
    back = formats.controlnet_from_original(original, {**dict(controlnet.config), **config})
    assert all(torch.equal(back[key], value) for key, value in controlnet.state_dict().items())


@pytest.mark.parametrize("flavor", ["sd15", "sd21"])
def test_controlnet_config_inferred_from_shapes(flavor):
    controlnet = sd_shaped_controlnet(flavor)
    inferred = formats.infer_controlnet_config(formats.controlnet_to_original(controlnet.state_dict(), controlnet.config))
    for key in ("in_channels", "conditioning_channels", "layers_per_block", "cross_attention_dim",
                "use_linear_projection", "transformer_layers_per_block"):
        assert inferred[key] == controlnet.config[key], key
    for key in ("block_out_channels", "down_block_types", "conditioning_embedding_out_channels"):
        assert list(inferred[key]) == list(controlnet.config[key]), key


def test_unknown_key_is_reported_not_dropped():
    controlnet = sd_shaped_controlnet("sd15")
    with pytest.raises(formats.UnknownKeyError):
        formats.controlnet_key_to_original("down_blocks.0.motion_modules.0.weight", controlnet.config)
    original = formats.controlnet_to_original(controlnet.state_dict(), controlnet.config)
    original["input_blocks.99.0.weight"] = torch.zeros(1)
    with pytest.raises(formats.UnknownKeyError, match="unexpected"):
        formats.controlnet_from_original(original, dict(controlnet.config))


@pytest.mark.parametrize("base_fixture", ["tiny_base", "tiny_base_v"])
def test_full_sd_written_original_is_read_back_by_diffusers_converters(base_fixture, request, tmp_path):
    """UNet, VAE and text encoder (CLIP for 1.x, OpenCLIP's fused layout for 2.x) all come back exactly."""
    base = request.getfixturevalue(base_fixture)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    path = save_sd_single_file(tmp_path / "base.safetensors", pipe.unet, pipe.vae, pipe.text_encoder,
                               pipe.scheduler.config.prediction_type)
    checkpoint, _ = read_checkpoint(path)
    assert any(key.startswith("first_stage_model.decoder.up.3.upsample") for key in checkpoint)
    parts = load_sd_single_file(path, tokenizer_name=str(base))
    for name in ("unet", "vae", "text_encoder"):
        expected, got = getattr(pipe, name).state_dict(), parts[name].state_dict()
        assert set(got) == set(expected), name
        assert all(torch.equal(got[key], expected[key]) for key in expected), name
    assert parts["scheduler"].config.prediction_type == pipe.scheduler.config.prediction_type
    assert parts["tokenizer"]("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids


def test_configs_inferred_when_the_file_has_no_metadata(tmp_path):
    """A community checkpoint carries no configs: SD's widths (divisible by 32 groups) are read from shapes."""
    from diffusers import UNet2DConditionModel

    from zeroconv.testing import tiny_text_encoder, tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    state = formats.sd_to_original(unet, tiny_vae(), tiny_text_encoder(20, 0, 1))
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "community.safetensors"))
    loaded = load_sd_single_file(tmp_path / "community.safetensors", components=("unet", "scheduler"))
    assert list(loaded["unet"].config.block_out_channels) == [32, 64]
    assert all(torch.equal(loaded["unet"].state_dict()[key], value) for key, value in unet.state_dict().items())
    assert loaded["scheduler"].config.prediction_type == "epsilon"


def test_sd15_unet_keys_are_lllyasviel_names():
    """Names A1111/ComfyUI look up in a real SD 1.5 checkpoint (diffusers' reader is lenient about some, e.g.
    the upsampler slot after an attention, so it cannot be the only judge)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's config
    original = formats.unet_to_original(unet.state_dict(), unet.config)
    assert len(original) == len(unet.state_dict()) == 686
    prefix = formats.UNET_PREFIX
    for key in ("input_blocks.3.0.op.weight", "input_blocks.9.0.op.bias", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.out_layers.3.weight",
                "middle_block.1.proj_out.bias", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "output_blocks.8.2.conv.bias", "output_blocks.11.1.norm.weight", "output_blocks.0.0.emb_layers.1.weight",
                "time_embed.2.bias", "out.0.weight", "out.2.weight"):
        assert prefix + key in original, key


@pytest.mark.parametrize("mix", ["fp32", "mixed"])
def test_files_zeroconv_writes_start_their_data_on_64_bytes(mix, tmp_path):
    """save_aligned predicts the header safetensors writes; if the prediction is off, the data would start on 8
    only and memory-mapped loads would compute differently in the last bit (tests/models/test_sdxl.py)."""
    import struct

    from safetensors.torch import load_file

    from zeroconv.models.single_file import save_aligned

    generator = torch.Generator().manual_seed(0)
    dtypes = [torch.float32] if mix == "fp32" else [torch.float32, torch.float16, torch.int64, torch.bool]
    for trial in range(20):
        tensors = {f"block.{i}.w{trial}": torch.zeros(int(torch.randint(1, 300, (1,), generator=generator)),
                                                       dtype=dtypes[i % len(dtypes)]) for i in range(1 + trial)}
        metadata = {"format": "pt", "note": "é" * trial}  # non-ASCII: safetensors counts UTF-8 bytes
        path = save_aligned(tensors, tmp_path / f"{trial}.safetensors", metadata)
        header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
        assert (8 + header_length) % 64 == 0, (trial, header_length)
        loaded = load_file(str(path))
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
