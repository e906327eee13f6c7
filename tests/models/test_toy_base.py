import numpy as np
import pytest
import torch

from zeroconv.models import toy_base


def test_shipped_toy_base_is_small_safetensors_with_a_card():
    path = toy_base.toy_base_path()
    files = [p for p in path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20e6
    weights = [p.name for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    card = (path / "README.md").read_text()
    assert "zeroconv toy-base train" in card and "seed:" in card and "wall time:" in card


def test_toy_resolves_everywhere_a_base_is_taken():
    import zeroconv
    from zeroconv.models.base import resolve_base

    assert zeroconv.toy_base() == str(toy_base.toy_base_path()) == resolve_base("toy")


def test_shipped_base_draws_the_prompted_colors():
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    from zeroconv.data.synth import fill_example
    from zeroconv.evaluate.fill import fill_metrics

    pipe = StableDiffusionPipeline.from_pretrained(toy_base.toy_base_path(), safety_checker=None)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    examples = [fill_example(seed=11, index=i, resolution=64, palette="distinct") for i in range(8)]
    images = pipe([e.prompt for e in examples], num_inference_steps=10, guidance_scale=3.0, height=64, width=64,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    scores = [fill_metrics(e.source, e.prompt, (im * 255).round().astype(np.uint8)) for e, im in zip(examples, images)]
    assert np.mean([s["background_color_accuracy"] for s in scores]) >= 0.75
    assert np.mean([s["circle_color_accuracy"] for s in scores]) >= 0.75
    # ...but not where the outline is: placing the circle is the ControlNet's job (the demo's baseline)
    assert np.mean([s["fill_iou"] for s in scores]) < 0.6


def test_toy_base_train_runs_a_few_steps_and_loads(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "toy"
    assert toy_base.main(["train", "--out", str(out), "--num_images", "8", "--vae_steps", "2", "--unet_steps", "2",
                          "--batch_size", "2", "--vae_batch_size", "2"]) == 0
    assert "toy base written" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.vae.config.block_out_channels[-1] and 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    assert "--unet_steps 2" in (out / "README.md").read_text()
    # the schedule that lets a flat-color model take its colors from the prompt: zero terminal SNR, v-prediction
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    image = pipe("red circle with blue background", num_inference_steps=2, height=64, width=64,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_path_prints_the_shipped_folder(capsys):
    assert toy_base.main(["path"]) == 0
    assert capsys.readouterr().out.strip() == str(toy_base.toy_base_path())


def test_train_without_out_is_a_user_error():
    from zeroconv.errors import UserError

    with pytest.raises(UserError, match="--out"):
        toy_base.main(["train"])
