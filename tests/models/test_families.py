"""Model families (zeroconv.models.families): one registry, the family read from the base, a clear error when
none matches, and no stage above models asking which family it has."""

import json
import re
from pathlib import Path

import pytest
import torch

from zeroconv.errors import UserError
from zeroconv.models.families import FAMILIES, detect, get_family

PACKAGE = Path(__file__).resolve().parents[2] / "zeroconv"


def test_sd_base_folder_is_the_sd_family(tiny_base):
    assert detect(str(tiny_base)).name == "sd"
    assert get_family("sd").name == "sd" and list(FAMILIES) == ["sd", "sdxl", "sd3", "flux"]


def test_folder_without_model_index_is_read_from_its_unet_config(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert detect(str(tmp_path)).name == "sd"
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                               "addition_embed_type": "text_time"}))
    assert detect(str(tmp_path)).name == "sdxl"
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                               "addition_embed_type": "image"}))
    with pytest.raises(UserError, match=r"--pretrained_model_name_or_path .*UNet2DConditionModel"):
        detect(str(tmp_path))


def test_unknown_pipeline_class_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(UserError, match=r"model_index\.json names WanPipeline.*StableDiffusionPipeline"):
        detect(str(tmp_path), "my-wan")


def test_single_file_family_from_its_keys(tmp_path):
    from safetensors.torch import save_file

    sd = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1)}, str(sd))
    assert detect(str(sd)).name == "sd"
    flux = tmp_path / "flux.safetensors"  # Black Forest Labs' layout: detected, then refused when loaded
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(flux))
    assert detect(str(flux)).name == "flux"
    with pytest.raises(UserError, match=r"a Flux single file; zeroconv trains Flux from a diffusers folder"):
        detect(str(flux)).load_base(str(flux), "flux.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(1)}, str(other))
    with pytest.raises(UserError, match=r"other\.safetensors: its keys \(top-level names blocks\)"):
        detect(str(other))


def test_no_stage_above_models_asks_which_family_it_has():
    asking = re.compile(r"family\s*(==|!=|\bin\b)|\.name\s*==\s*[\"']sd|isinstance\([^)]*StableDiffusion\b")
    offenders = [f"{path.relative_to(PACKAGE)}:{n}" for folder in ("train", "data", "evaluate")
                 for path in sorted((PACKAGE / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if asking.search(line)]
    assert offenders == []
