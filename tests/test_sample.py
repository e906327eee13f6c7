import json

import numpy as np
import pytest
from PIL import Image

from zeroconv.errors import UserError
from zeroconv.sample import SCHEDULERS, main


@pytest.fixture(scope="module")
def controlnet_dir(tiny_base, tmp_path_factory):
    from zeroconv.models.base import load_base
    from zeroconv.models.controlnet import build_controlnet

    base = load_base(str(tiny_base))
    out = tmp_path_factory.mktemp("controlnet")
    build_controlnet(base.unet, base.vae_scale_factor).save_pretrained(out)
    (out / "config.yaml").write_text(f"pretrained_model_name_or_path: {tiny_base}\nresolution: 64\n")
    return out


@pytest.fixture()
def condition(tmp_path):
    path = tmp_path / "cond.png"
    Image.fromarray(np.zeros((80, 64, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sample_writes_pngs_with_each_scheduler(controlnet_dir, condition, tmp_path, scheduler):
    out = tmp_path / "out"
    assert main(["--controlnet", str(controlnet_dir), "--image", str(condition), "--prompt", "a red square",
                 "--steps", "2", "--scheduler", scheduler, "--num_images", "2", "--out", str(out)]) == 0
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == ["00000_0.png", "00000_1.png"]
    assert Image.open(images[0]).size == (64, 64)  # the training resolution recorded beside the ControlNet


def test_sample_jsonl_batch_and_guess_mode(controlnet_dir, condition, tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"condition": str(condition), "prompt": p}) for p in ("a", "b", "")))
    out = tmp_path / "out"
    assert main(["--controlnet", str(controlnet_dir), "--jsonl", str(jsonl), "--steps", "2", "--guess_mode",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a", "b", ""]


def test_sample_errors_name_the_flag(controlnet_dir, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        main(["--controlnet", str(controlnet_dir), "--image", str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match="--jsonl"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("{not json}\n")
        main(["--controlnet", str(controlnet_dir), "--jsonl", str(bad)])
