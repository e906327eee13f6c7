import shutil

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
    card = (out / "README.md").read_text()
    assert "--unet_steps 2" in card and "in one sitting" in card and "--out DIR" in card and str(tmp_path) not in card
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


def tiny_run(out, *extra):
    return ["train", "--out", str(out), "--num_images", "8", "--vae_steps", "2", "--unet_steps", "5",
            "--batch_size", "2", "--vae_batch_size", "2", "--checkpoint_every", "2", *extra]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint_contents(folder):
    from safetensors.torch import load_file

    contents = {p.name: load_file(p) for p in folder.glob("*.safetensors")}
    contents.update({p.name: torch.load(p, weights_only=False) for p in folder.glob("*.pt")})
    assert {"vae.safetensors", "unet.safetensors", "text_encoder.safetensors", "ema.safetensors", "optimizer.pt",
            "schedule.pt", "rng.pt"} <= contents.keys()
    return contents


def test_stopped_run_continues_bit_exactly(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    # Both runs stop right after their last checkpoint (step 5), so the whole training state is compared (raw
    # weights, average, optimizer, generators), not only the averaged weights the pipeline keeps.
    monkeypatch.setenv(toy_base.STOP_ENV, "5")
    with pytest.raises(toy_base.StoppedForTest):
        toy_base.main(tiny_run(straight))
    expected = checkpoint_contents(straight / ".progress" / "step-5")

    monkeypatch.setenv(toy_base.STOP_ENV, "2")
    with pytest.raises(toy_base.StoppedForTest):
        toy_base.main(tiny_run(stopped))
    progress = stopped / ".progress"
    assert [p.name for p in progress.iterdir()] == ["step-2"]  # step 0's checkpoint went once step 2's was in
    # A kill in the middle of saving step 4 leaves a tmp folder, or (had it died between os.replace and its marker,
    # which the order of the writes rules out) a folder without COMPLETE: neither may be loaded.
    for broken in (progress / ".tmp-step-4-1", progress / "step-4"):
        shutil.copytree(progress / "step-2", broken)
        (broken / "unet.safetensors").write_bytes(b"half written")
    (progress / "step-4" / "COMPLETE").unlink()
    capsys.readouterr()
    monkeypatch.setenv(toy_base.STOP_ENV, "5")
    with pytest.raises(toy_base.StoppedForTest):
        toy_base.main(tiny_run(stopped))
    assert "continuing from step 2 of 5" in capsys.readouterr().out
    assert [p.name for p in progress.iterdir()] == ["step-5"]
    continued = checkpoint_contents(progress / "step-5")
    assert continued.keys() == expected.keys()
    for name in expected:
        assert same(continued[name], expected[name]), name

    monkeypatch.delenv(toy_base.STOP_ENV)
    for out in (straight, stopped):
        assert toy_base.main(tiny_run(out)) == 0
    for part in ("vae", "unet", "text_encoder"):
        a = load_file(next((straight / part).glob("*.safetensors")))
        b = load_file(next((stopped / part).glob("*.safetensors")))
        assert same(a, b), part
    # finished: the checkpoints (with .pt files a shipped folder must not hold) are gone, a small record stays
    assert [p.name for p in progress.iterdir()] == ["finished.json"]
    card = (stopped / "README.md").read_text()
    assert "run in 3 sittings" in card and "test_stopped_run_continues_bit_exactly" in card
    assert str(tmp_path) not in card and "--out DIR" in card and "seed: 0" in card
    # the size of the model, not of the last checkpoint still on disk when the card was written
    assert f"size on disk: {toy_base.folder_megabytes(stopped):.1f} MB" in card
    assert "run in 2 sittings" in (straight / "README.md").read_text()
    capsys.readouterr()
    assert toy_base.main(tiny_run(stopped)) == 0  # run again once finished: nothing is trained twice
    assert "nothing to do" in capsys.readouterr().out


def test_continuing_refuses_a_changed_option_and_skips_the_autoencoder(tmp_path, monkeypatch, capsys):
    from zeroconv.errors import UserError

    out = tmp_path / "toy"
    monkeypatch.setenv(toy_base.STOP_ENV, "0")  # right after the autoencoder stage's checkpoint
    with pytest.raises(toy_base.StoppedForTest):
        toy_base.main(tiny_run(out))
    with pytest.raises(UserError, match=r"--unet_steps 5 there, 6 now.*new --out"):
        toy_base.main(tiny_run(out, "--unet_steps", "6"))
    with pytest.raises(UserError, match=r"--seed 0 there, 1 now"):
        toy_base.main(tiny_run(out, "--seed", "1"))

    def no_second_autoencoder(*args, **kwargs):
        raise AssertionError("the autoencoder stage ran again")

    monkeypatch.setattr(toy_base, "train_vae", no_second_autoencoder)
    monkeypatch.setenv(toy_base.STOP_ENV, "2")
    capsys.readouterr()
    with pytest.raises(toy_base.StoppedForTest):
        toy_base.main(tiny_run(out))
    assert "continuing from step 0 of 5" in capsys.readouterr().out


def test_card_hides_the_out_folder():
    assert toy_base.public_argv(["train", "--out", "/home/me/tb", "--seed", "0", "--out=/x"]) == [
        "train", "--out", "DIR", "--seed", "0", "--out", "DIR"]
