"""Training an SD3 ControlNet (issue 15) on the tiny SD3 base with diffusers' train_controlnet_sd3.py flag set:
it trains, checkpoints, validates with the SD3 pipeline, resumes bit-identically, and what it saves loads in
StableDiffusion3ControlNetPipeline."""

import json
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train.helpers import controlnet_weights, losses, run_training

# train_controlnet_sd3.py's flags (names and meanings as there) at the tiny base's size, and four
# zeroconv-only ones: --num_layers (from_transformer's argument, 12 by default: the tiny base has 2 blocks, so 1),
# --validation_inference_steps, --latent_cache_dir, --logging_steps (every step logged, for the loss comparison).
SD3_SCRIPT_FLAGS = (
    "--pretrained_model_name_or_path={base} --train_data_dir={data} --output_dir={out} --resolution=64 "
    "--learning_rate=1e-4 --train_batch_size=2 --gradient_accumulation_steps=1 --max_train_steps={steps} "
    "--checkpointing_steps=2 --seed=7 --lr_scheduler=constant --lr_warmup_steps=0 --mixed_precision=no "
    "--weighting_scheme=logit_normal --logit_mean=0.0 --logit_std=1.0 --mode_scale=1.29 --precondition_outputs=1 "
    "--max_sequence_length=77 --num_extra_conditioning_channels=0 --proportion_empty_prompts=0.5 --upcast_vae "
    "--dataset_preprocess_batch_size=1000 "
    "--validation_prompt='a red square' --validation_image={condition} --num_validation_images=1 "
    "--validation_steps=4 --report_to=none --num_layers=1 --validation_inference_steps=2 --latent_cache_dir={cache} "
    "--logging_steps=1"
)


def sd3_config(base, data, out, steps, cache, **extra):
    from zeroconv.config import TrainConfig, parse

    condition = next((data / "conditioning").glob("*.png"))
    args = shlex.split(SD3_SCRIPT_FLAGS.format(base=base, data=data, out=out, steps=steps, condition=condition,
                                               cache=cache))
    args += [f"--{key}={value}" for key, value in extra.items()]
    return parse(TrainConfig, args, prog="zeroconv train")


def test_sd3_script_flags_train_checkpoint_resume_exactly_and_load_in_diffusers(tiny_sd3_base, tiny_dataset,
                                                                                tmp_path):
    straight, resumed, cache = tmp_path / "straight", tmp_path / "resumed", tmp_path / "cache"
    cfg = sd3_config(tiny_sd3_base, tiny_dataset, straight, 4, cache)
    assert (cfg.weighting_scheme, cfg.precondition_outputs, cfg.upcast_vae, cfg.max_sequence_length) == \
        ("logit_normal", True, True, 77)
    assert run_training(cfg) == 0
    assert run_training(sd3_config(tiny_sd3_base, tiny_dataset, resumed, 2, cache)) == 0
    assert (resumed / "checkpoint-2" / "COMPLETE").is_file()
    assert run_training(sd3_config(tiny_sd3_base, tiny_dataset, resumed, 4, cache,
                                   resume_from_checkpoint="latest")) == 0
    a, b = controlnet_weights(straight), controlnet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "pos_embed_input.proj.weight" in a and a["pos_embed_input.proj.weight"].abs().sum() > 0  # it learned
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    assert np.isfinite(list(losses(straight).values())).all()
    config = json.loads((straight / "config.json").read_text())
    assert config["_class_name"] == "SD3ControlNetModel" and config["num_layers"] == 1
    # the latent cache served the run (its prompts are the SD3 pair) and validation sampled the SD3 pipeline
    manifest = json.loads(next(cache.glob("*/manifest.json")).read_text())
    assert manifest["prompts"] == ["pooled_prompt_embeds", "prompt_embeds"]
    grid = Image.open(straight / "validation" / "step-000004.png")
    assert np.asarray(grid).std() > 0

    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    controlnet = SD3ControlNetModel.from_pretrained(straight)
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(tiny_sd3_base, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    condition = Image.open(next((tiny_dataset / "conditioning").glob("*.png")))
    image = pipe("a red square", control_image=condition, num_inference_steps=2, height=64, width=64,
                 max_sequence_length=77, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_sd3_step_feeds_the_controlnet_the_conditions_latents(tiny_sd3_base, tiny_dataset, tmp_path):
    """One live step: the ControlNet gets the condition's VAE latents (16 channels on the latent grid), the
    transformer the ControlNet's residuals, and the step's random draws come from the run's generator."""
    from accelerate.state import AcceleratorState, GradientState

    from zeroconv.train.loop import compute_loss
    from zeroconv.train.run import setup
    from tests.train.helpers import tiny_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    t = setup(tiny_config(tiny_sd3_base, tiny_dataset, tmp_path, num_layers=1, train_batch_size=2))
    seen = {}
    t.controlnet.register_forward_pre_hook(lambda _m, _a, kw: seen.update(cond=kw["controlnet_cond"]),
                                           with_kwargs=True)
    t.unet.register_forward_pre_hook(lambda _m, _a, kw: seen.update(res=kw["block_controlnet_hidden_states"]),
                                     with_kwargs=True)
    batch = next(t.batches)
    losses_ = []
    for _ in range(2):
        with torch.no_grad():
            losses_.append(compute_loss(t, batch).item())
    assert losses_[0] == losses_[1] and np.isfinite(losses_[0])
    assert seen["cond"].shape == (2, 16, 8, 8) and len(seen["res"]) == 1
    t.accelerator.end_training()


def test_flux_script_memory_flags_adafactor_save_dtype_and_cpu_offload(tiny_sd3_base, tiny_dataset, tmp_path):
    from transformers import Adafactor

    from tests.train.helpers import tiny_config
    from zeroconv.errors import UserError
    from zeroconv.train.finish import save_controlnet
    from zeroconv.train.preflight import check_optional_packages
    from zeroconv.train.setup import make_optimizer

    param = torch.nn.Parameter(torch.ones(3))
    cfg = tiny_config(tiny_sd3_base, tiny_dataset, tmp_path, use_adafactor=True, learning_rate=1e-3)
    optimizer = make_optimizer(cfg, [param], [], 1.0)
    assert isinstance(optimizer, Adafactor)
    assert optimizer.defaults["lr"] == 1e-3 and not optimizer.defaults["relative_step"]
    assert not optimizer.defaults["scale_parameter"] and optimizer.defaults["weight_decay"] == 1e-2

    from diffusers import SD3ControlNetModel

    from zeroconv.models.base import load_base

    base = load_base(str(tiny_sd3_base))
    controlnet = base.family.build_controlnet(base, num_layers=1)
    save_controlnet(controlnet, tmp_path / "half", torch.float16)
    saved = controlnet_weights(tmp_path / "half")  # the file's tensors: from_pretrained would load them as float32
    assert {tensor.dtype for tensor in saved.values()} == {torch.float16}
    assert torch.equal(saved["pos_embed.proj.weight"], controlnet.pos_embed.proj.weight.half())
    assert SD3ControlNetModel.from_pretrained(tmp_path / "half").config.num_layers == 1
    assert controlnet.dtype == torch.float32  # the live weights are untouched

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--enable_model_cpu_offload .*no GPU here.*drop the flag"):
            check_optional_packages(tiny_config(tiny_sd3_base, tiny_dataset, tmp_path, enable_model_cpu_offload=True))
