"""Training a Flux ControlNet (issue 15) on the tiny Flux base with diffusers' train_controlnet_flux.py flag set: it
trains, checkpoints, validates with the Flux pipeline, resumes bit-identically, and what it saves loads in
FluxControlNetPipeline. A guidance-distilled base (FLUX.1-dev's guidance embedding) reads --guidance_scale."""

import json
import shlex

import numpy as np
import torch
from PIL import Image

from tests.train.helpers import controlnet_weights, losses, run_training

# train_controlnet_flux.py's flags (names and meanings as there) at the tiny base's size (2 double and 2 single
# blocks, so 1 and 1 copied), and four zeroconv-only ones: --validation_inference_steps, --latent_cache_dir,
# --logging_steps (every step logged, for the loss comparison), --max_sequence_length (the script's 512 is the
# default; 32 keeps the tiny T5 quick).
FLUX_SCRIPT_FLAGS = (
    "--pretrained_model_name_or_path={base} --train_data_dir={data} --output_dir={out} --resolution=64 "
    "--learning_rate=1e-4 --train_batch_size=2 --gradient_accumulation_steps=1 --max_train_steps={steps} "
    "--checkpointing_steps=2 --seed=7 --lr_scheduler=constant --lr_warmup_steps=0 --mixed_precision=no "
    "--weighting_scheme=logit_normal --logit_mean=0.0 --logit_std=1.0 --mode_scale=1.29 "
    "--num_double_layers=1 --num_single_layers=1 --guidance_scale=3.5 --save_weight_dtype=fp32 "
    "--proportion_empty_prompts=0.5 --validation_prompt='a red square' --validation_image={condition} "
    "--num_validation_images=1 --validation_steps=4 --report_to=none --validation_inference_steps=2 "
    "--latent_cache_dir={cache} --logging_steps=1 --max_sequence_length=32"
)


def flux_config(base, data, out, steps, cache, **extra):
    from zeroconv.config import TrainConfig, parse

    condition = next((data / "conditioning").glob("*.png"))
    args = shlex.split(FLUX_SCRIPT_FLAGS.format(base=base, data=data, out=out, steps=steps, condition=condition,
                                                cache=cache))
    args += [f"--{key}={value}" for key, value in extra.items()]
    return parse(TrainConfig, args, prog="zeroconv train")


def test_flux_script_flags_train_checkpoint_resume_exactly_and_load_in_diffusers(tiny_flux_base, tiny_dataset,
                                                                                 tmp_path):
    straight, resumed, cache = tmp_path / "straight", tmp_path / "resumed", tmp_path / "cache"
    cfg = flux_config(tiny_flux_base, tiny_dataset, straight, 4, cache)
    assert (cfg.num_double_layers, cfg.num_single_layers, cfg.guidance_scale) == (1, 1, 3.5)
    assert run_training(cfg) == 0
    assert run_training(flux_config(tiny_flux_base, tiny_dataset, resumed, 2, cache)) == 0
    assert (resumed / "checkpoint-2" / "COMPLETE").is_file()
    assert run_training(flux_config(tiny_flux_base, tiny_dataset, resumed, 4, cache,
                                    resume_from_checkpoint="latest")) == 0
    a, b = controlnet_weights(straight), controlnet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["controlnet_x_embedder.weight"].abs().sum() > 0  # it learned: the condition's embedding left zero
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    assert np.isfinite(list(losses(straight).values())).all()
    config = json.loads((straight / "config.json").read_text())
    assert config["_class_name"] == "FluxControlNetModel"
    assert (config["num_layers"], config["num_single_layers"]) == (1, 1)
    # the latent cache served the run (its prompts are Flux's pair, T5 at the run's length) and validation sampled
    manifest = json.loads(next(cache.glob("*/manifest.json")).read_text())
    assert manifest["prompts"] == ["pooled_prompt_embeds", "prompt_embeds"]
    grid = Image.open(straight / "validation" / "step-000004.png")
    assert np.asarray(grid).std() > 0

    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    controlnet = FluxControlNetModel.from_pretrained(straight)
    pipe = FluxControlNetPipeline.from_pretrained(tiny_flux_base, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    condition = Image.open(next((tiny_dataset / "conditioning").glob("*.png")))
    image = pipe("a red square", control_image=condition, num_inference_steps=2, height=64, width=64,
                 max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_flux_step_packs_the_conditions_latents_and_passes_the_guidance(tmp_path, tiny_dataset):
    """One live step on a guidance-distilled base: the ControlNet gets the condition's packed VAE latents, both
    networks the packed noisy latents and --guidance_scale, the transformer the ControlNet's residuals of both
    block kinds, and the step's random draws come from the run's generator."""
    from accelerate.state import AcceleratorState, GradientState

    from tests.train.helpers import tiny_config
    from zeroconv.testing import make_tiny_flux_base
    from zeroconv.train.loop import compute_loss
    from zeroconv.train.run import setup

    base = make_tiny_flux_base(tmp_path / "dev", guidance_embeds=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    t = setup(tiny_config(base, tiny_dataset, tmp_path, num_double_layers=1, num_single_layers=2,
                          train_batch_size=2, guidance_scale=2.5, max_sequence_length=16))
    seen = {}
    t.controlnet.register_forward_pre_hook(lambda _m, _a, kw: seen.update(cond=kw["controlnet_cond"],
                                                                          guidance=kw["guidance"]), with_kwargs=True)
    t.unet.register_forward_pre_hook(lambda _m, _a, kw: seen.update(
        x=kw["hidden_states"], double=kw["controlnet_block_samples"], single=kw["controlnet_single_block_samples"]),
        with_kwargs=True)
    batch = next(t.batches)
    losses_ = []
    for _ in range(2):
        with torch.no_grad():
            losses_.append(compute_loss(t, batch).item())
    assert losses_[0] == losses_[1] and np.isfinite(losses_[0])
    assert seen["cond"].shape == (2, 16, 64) and seen["x"].shape == (2, 16, 64)  # 8x8 latents in 2x2 patches
    assert torch.equal(seen["guidance"], torch.full((2,), 2.5))
    # one residual per ControlNet block (1 double, 2 single), which the transformer spreads over its own blocks
    assert len(seen["double"]) == 1 and len(seen["single"]) == 2
    t.accelerator.end_training()
