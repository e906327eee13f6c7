"""End-to-end training on tiny bases (issue 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.helpers import controlnet_weights, losses, run_training, tiny_config
from zeroconv.errors import UserError


def test_train_checkpoint_resume_and_pipeline(tiny_base, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_base, tiny_dataset, out, max_train_steps=20, checkpointing_steps=10,
                      checkpoints_total_limit=1)
    assert run_training(cfg) == 0
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-20"]  # limit 1: checkpoint-10 pruned after checkpoint-20 was complete
    assert (out / "checkpoint-20" / "COMPLETE").is_file()

    cfg = tiny_config(tiny_base, tiny_dataset, out, max_train_steps=30, checkpointing_steps=10,
                      checkpoints_total_limit=1, resume_from_checkpoint="latest")
    assert run_training(cfg) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-30"]
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 30
    assert min(losses(out)) == 1  # first run logged steps 1..20, the resumed one 21..30
    assert set(losses(out)) == set(range(1, 31))

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    controlnet = ControlNetModel.from_pretrained(out)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_base, controlnet=controlnet, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond = Image.open(next(Path(tiny_dataset, "conditioning").glob("*.png")))
    image = pipe("a red square", image=cond, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_training_lowers_loss_on_fixed_batch(tiny_base, tiny_dataset, tmp_path):
    from accelerate.state import AcceleratorState

    from zeroconv.data.dataset import collate
    from zeroconv.train.loop import compute_loss, train_loop
    from zeroconv.train.run import setup

    def fixed_batch_loss(t):
        batch = collate([t.dataset[i] for i in range(8)])
        with torch.no_grad():  # the same noise and timesteps before and after training
            return compute_loss(t, batch, torch.Generator().manual_seed(1234)).item()

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = tiny_config(tiny_base, tiny_dataset, tmp_path / "run", max_train_steps=60, learning_rate=2e-3,
                      proportion_empty_prompts=0.0)
    trainer = setup(cfg)
    before = fixed_batch_loss(trainer)
    assert train_loop(trainer) == 0
    after = fixed_batch_loss(trainer)
    assert after < 0.9 * before, (before, after)


def test_v_prediction_base_trains(tiny_base_v, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert run_training(tiny_config(tiny_base_v, tiny_dataset, out, max_train_steps=2)) == 0
    assert (out / "diffusion_pytorch_model.safetensors").is_file()


def test_sd_unlocked_trains_decoder_only(tiny_base, tiny_dataset, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    cfg = tiny_config(tiny_base, tiny_dataset, out, max_train_steps=3, sd_locked=False, decoder_learning_rate=1e-3)
    assert run_training(cfg) == 0
    before = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(out / "unet_decoder").state_dict()
    decoder = ("up_blocks.", "conv_norm_out.", "conv_out.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the decoder did not change"
    assert all(k.startswith(decoder) for k in changed), sorted(k for k in changed if not k.startswith(decoder))[:5]


def test_only_mid_control_keeps_down_zero_convs_zero(tiny_base, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=3, only_mid_control=True)) == 0
    weights = controlnet_weights(out)
    assert all(torch.count_nonzero(v) == 0 for k, v in weights.items() if k.startswith("controlnet_down_blocks."))
    assert torch.count_nonzero(weights["controlnet_mid_block.weight"]) > 0


@pytest.mark.parametrize("override, needle", [
    (dict(pretrained_model_name_or_path="/nonexistent/base"), "--pretrained_model_name_or_path"),
    (dict(pretrained_model_name_or_path="someone/some-model"), "offline"),
    (dict(resolution=60), "--resolution"),
    (dict(caption_column="prompt"), "prompt"),
    (dict(validation_prompt=["a", "b"], validation_image=["x.png", "y.png", "z.png"]), "pair"),
    (dict(validation_prompt=["a"]), "--validation_image"),
    (dict(output_dir="/proc/zeroconv-cannot-write"), "--output_dir"),
    (dict(condition="no-such-extractor"), "no-such-extractor"),
    (dict(use_8bit_adam=True), "--use_8bit_adam"),
    (dict(report_to="wandb"), "wandb"),
    (dict(push_to_hub=True), "cannot push to the Hub"),
    (dict(validation_metric="no-such-metric"), "no-such-metric"),
])
def test_bad_input_fails_before_model_load(tiny_base, tiny_dataset, tmp_path, override, needle, monkeypatch):
    import zeroconv.models.base as base_module

    monkeypatch.setattr(base_module, "load_base", lambda *a, **k: pytest.fail("model loaded before checks"))
    cfg = tiny_config(tiny_base, tiny_dataset, tmp_path / "run", **override)
    with pytest.raises(UserError, match=None) as info:
        from zeroconv.train.preflight import preflight

        preflight(cfg)
    assert needle in str(info.value)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zeroconv", "train", "--pretrained_model_name_or_path",
                           str(tmp_path / "missing"), "--train_data_dir", str(tmp_path)],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "--pretrained_model_name_or_path" in proc.stderr


def test_condition_on_the_fly_and_controllability_curve(tiny_base, tmp_path):
    import shutil

    from zeroconv.testing import make_image_dataset

    data = make_image_dataset(tmp_path / "data", n=8, size=64, layout="kohya")
    shutil.rmtree(data / "conditioning")  # images and captions only: canny computes the conditions
    validation_image = next((data / "images").glob("*.png"))
    out = tmp_path / "run"
    cfg = tiny_config(tiny_base, data, out, max_train_steps=4, condition="canny", validation_steps=2,
                      validation_image=[str(validation_image)], validation_prompt=["a red square"],
                      num_validation_images=1, validation_inference_steps=2)
    assert run_training(cfg) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = {row["step"]: row for row in rows if any(k.startswith("validation/") for k in row)}
    assert sorted(curve) == [0, 2, 4]  # step 0 is the base alone: the baseline
    assert all(0.0 <= row["validation/edge_f1"] <= 1.0 for row in curve.values())
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "step-000000.png", "step-000002.png", "step-000004.png"]
    summary = json.loads((out / "train_summary.json").read_text())["controllability"]["edge_f1"]
    assert summary["baseline"] == curve[0]["validation/edge_f1"] and summary["final_step"] == 4


def test_bf16_validation_samples_with_the_fp32_controlnet_beside_the_bf16_base(tiny_base, tmp_path):
    """--mixed_precision bf16 (auto's choice on a GPU, and on a bf16 CPU from 256 px): the frozen base in bf16,
    the ControlNet in fp32; validation samples both, which failed inside the UNet's group norms before its
    residuals were cast to the base's dtype."""
    import numpy as np
    from PIL import Image

    from zeroconv.testing import make_image_dataset

    data = make_image_dataset(tmp_path / "data", n=4, size=64, layout="kohya")
    out = tmp_path / "run"
    cfg = tiny_config(tiny_base, data, out, max_train_steps=2, mixed_precision="bf16", validation_steps=2,
                      validation_image=[str(next((data / "conditioning").glob("*.png")))],
                      validation_prompt=["a red square"], num_validation_images=1, validation_inference_steps=2)
    assert run_training(cfg) == 0
    grids = sorted((out / "validation").glob("*.png"))
    assert [p.name for p in grids] == ["step-000002.png"]
    assert np.asarray(Image.open(grids[-1])).std() > 0  # sampled, not a blank image
