"""The one builder of sampling pipelines: `zeroconv sample`, validation during training and the demo's baseline.

The pipeline is assembled from modules already in the dtype it samples in: `load_base(..., dtype=)` and
`load_controlnet(..., dtype=)` load the weights in it. Building in float32 and casting with `.to(dtype)` would
hold every weight in float32 first, and cast too the modules a model keeps in float32 when loaded in a dtype;
diffusers warns about it once per model ("There are modules in UNet2DConditionModel that should be kept in
float32 ... Casting directly with `to()`..."). Move a built pipeline with `.to(device)` only.
"""

from __future__ import annotations

from pathlib import Path

from zeroconv.errors import UserError

# name -> (diffusers scheduler class, its options); all made from the base's own noise schedule
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
}


def load_controlnet(path: str, family, dtype=None):
    """A trained ControlNet of `family` (a diffusers folder, a zeroconv output_dir or checkpoint-N, or a hub id) in
    `dtype`. A checkpoint of a --use_ema run gives its average, as validation sampled it."""
    from zeroconv.hub import EMA_FOLDER

    folder = Path(path)
    for inside in (EMA_FOLDER, "controlnet"):  # a checkpoint-N folder
        if (folder / inside / "config.json").is_file():
            folder = folder / inside
            break
    if folder.exists() and not (folder / "config.json").is_file():
        raise UserError(f"--controlnet {path}: no config.json; expected a diffusers ControlNet folder, a zeroconv "
                        "output_dir or checkpoint (use `zeroconv import` for a single file)")
    return family.load_controlnet(str(folder) if folder.exists() else path, dtype=dtype)


def make_scheduler(base, scheduler: str = "unipc"):
    """The sampling scheduler `scheduler` (a SCHEDULERS name) made from the base's own noise schedule."""
    import diffusers

    class_name, options = SCHEDULERS[scheduler]
    return getattr(diffusers, class_name).from_config(base.noise_scheduler.config, **options)


def build_pipeline(base, controlnet=None, *, unet=None, scheduler: str = "unipc"):
    """A StableDiffusionControlNetPipeline of `base` and `controlnet` (a StableDiffusionPipeline of the base alone
    when `controlnet` is None) sampling with `scheduler`, progress bar off. `unet` replaces base.unet (training
    with --sd_locked false samples its live UNet). The modules are used as they are: no copy, no cast."""
    import diffusers

    modules = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                   unet=unet if unet is not None else base.unet, scheduler=make_scheduler(base, scheduler),
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if controlnet is None:
        pipe = diffusers.StableDiffusionPipeline(**modules)
    else:
        pipe = diffusers.StableDiffusionControlNetPipeline(controlnet=controlnet, **modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe
