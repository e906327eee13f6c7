"""The model card: Hub metadata that parses, the run's facts, and usage for diffusers and A1111/ComfyUI."""

from huggingface_hub import ModelCard

from zeroconv.card import read_card_info, write_model_card


def test_card_has_metadata_facts_grid_and_usage(tmp_path):
    grid = tmp_path / "validation" / "step-000500.png"
    grid.parent.mkdir()
    grid.write_bytes(b"png")
    info = {"base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "condition": "canny",
            "dataset": "user/fill50k", "steps": 500, "effective_batch": 16, "resolution": 512,
            "controllability": {"validation/canny_f1": 0.41234, "validation/ssim": 0.7}, "validation_grid": str(grid),
            "repo_id": "user/controlnet-canny", "single_file": "controlnet-canny-fp16.safetensors", "sd_locked": True}
    path = write_model_card(tmp_path, info)
    card = ModelCard.load(path)
    assert card.data.license == "creativeml-openrail-m"
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.datasets == ["user/fill50k"]
    assert "controlnet" in card.data.tags and "condition-canny" in card.data.tags
    text = path.read_text()
    for expected in ("| Training steps | 500 |", "| Effective batch | 16 |", "| validation/canny_f1 | 0.4123 |",
                     "![validation grid](validation/step-000500.png)", 'ControlNetModel.from_pretrained("user/'
                     'controlnet-canny"', "ComfyUI/models/controlnet/", "sd-webui-controlnet",
                     "controlnet-canny-fp16.safetensors"):
        assert expected in text, expected
    assert read_card_info(tmp_path)["steps"] == 500
    assert read_card_info(tmp_path)["controllability"]["validation/ssim"] == 0.7


def test_card_with_local_base_and_no_figures(tmp_path):
    path = write_model_card(tmp_path / "model", {"base_model": str(tmp_path), "license": "openrail++"})
    card = ModelCard.load(path)
    assert card.data.license == "openrail++"
    assert card.data.base_model is None  # a local path is no Hub id
    text = path.read_text()
    assert "## Controllability" not in text and "![validation grid]" not in text
    assert "path/to/the/sd-base" in text
    assert read_card_info(tmp_path / "nothing") == {}
