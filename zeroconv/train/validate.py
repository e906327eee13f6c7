"""Validation during training: sample from the live modules with fixed seeds, save a grid, score control.

A validation never kills training: any error (out of memory included) is logged and the run goes on. It runs
inside a forked RNG so a run with validation resumes to the same weights as one without.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zeroconv.config import union_columns, validation_condition_types
from zeroconv.data.transforms import load_condition
from zeroconv.evaluate.grid import make_grid
from zeroconv.models.dtypes import denoiser_input_cast

logger = logging.getLogger("zeroconv.validate")


def condition_to_rgb(cond: torch.Tensor) -> Image.Image:
    array = (cond[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(array[..., :3])


def generate(pipe, pairs_with_conditions, num_images: int, seed: int, steps: int, guidance: float, device,
             control_modes: list[int] | None = None):
    """Samples for each (condition tensor, prompt); image k of every pair uses seed + k. A union ControlNet's
    pair i is sampled with control_mode control_modes[i]."""
    results = []
    for i, (cond, prompt) in enumerate(pairs_with_conditions):
        samples = []
        mode = {} if control_modes is None else {"control_mode": control_modes[i]}
        for k in range(num_images):
            generator = torch.Generator(device="cpu").manual_seed(seed + k)
            out = pipe(prompt, image=cond.to(device), num_inference_steps=steps, guidance_scale=guidance,
                       generator=generator, height=cond.shape[-2], width=cond.shape[-1], **mode)
            samples.append(out.images[0])
        results.append(samples)
    return results


def warn_blank(samples: list[list[Image.Image]], step: int) -> int:
    """Log the all-black samples (what NaN latents decode to); returns how many there were."""
    blank = sum(1 for images in samples for image in images if not np.asarray(image).any())
    if blank:
        logger.warning("validation at step %d: %d of %d samples are all black, which is what NaN values decode to "
                       "(half precision overflowing, often in the VAE: SDXL's VAE needs float32, or "
                       "madebyollin/sdxl-vae-fp16-fix). Try --mixed_precision bf16 or no; if the loss is NaN too, "
                       "lower --learning_rate", step, blank, sum(len(images) for images in samples))
    return blank


@contextlib.contextmanager
def residuals_in(controlnet, denoiser):
    """The ControlNet's residuals cast to the frozen denoiser's dtype while sampling, by the rule the training step
    casts them with (models.dtypes.denoiser_input_cast): a pipeline adds them to the denoiser's activations as they
    come, and fp32 residuals turn a bf16 UNet's activations fp32, which CPU group norms with bf16 weights refuse.
    An fp32 denoiser takes the residuals as they come, so no hook is installed."""
    target = denoiser_input_cast(denoiser)
    if target is None:
        yield
        return

    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(target) if value.is_floating_point() else value
        if isinstance(value, dict):  # diffusers' output classes are ordered dicts
            return type(value)(**{key: cast(item) for key, item in value.items()})
        if isinstance(value, (list, tuple)):
            return type(value)(cast(item) for item in value)
        return value

    handle = controlnet.register_forward_hook(lambda module, args, output: cast(output))
    try:
        yield
    finally:
        handle.remove()


def run_validation(t, step: int, controlnet) -> dict[str, float]:
    """Grid PNG + tracker image + controllability metrics for the current weights, sampled with `controlnet` (the
    unwrapped live module, or under DeepSpeed/FSDP its gathered copy: TrainingRun.full_controlnet). Never raises."""
    try:
        # Under autocast, as the step: the pipeline hands the fp32 ControlNet the base's bf16/fp16 latents and
        # prompt embeddings. CPU convolutions accept that mix (the bf16 validation test passes without autocast),
        # CUDA's refuse it. Autocast does not cast the residuals the base adds, hence residuals_in as well.
        with torch.random.fork_rng(devices=[t.device] if t.device.type == "cuda" else []), torch.no_grad(), \
                t.accelerator.autocast(), residuals_in(controlnet, t.unet):
            return _run_validation(t, step, controlnet)
    except Exception as exc:  # noqa: BLE001 - validation must never kill a run
        logger.error("validation at step %d failed, training goes on: %s: %s", step, type(exc).__name__, exc)
        return {}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run_validation(t, step: int, controlnet) -> dict[str, float]:
    cfg = t.cfg
    unet = t.accelerator.unwrap_model(t.unet)
    t.encoders_to_device()  # a cached run keeps the VAE and text encoder off the device until now
    # the live modules, in the dtypes training holds them in: nothing is copied or cast for a validation
    pipe = t.base.family.pipeline(t.base, controlnet, unet=unet)
    if cfg.enable_model_cpu_offload:  # each model on the GPU only while it runs; undone below for training
        pipe.enable_model_cpu_offload(device=t.device)
    metrics: dict[str, float] = {}
    pairs = [(load_condition(path, cfg.resolution, cfg.conditioning_channels, cfg.image_interpolation_mode), prompt)
             for path, prompt in t.validation_pairs]
    # a union ControlNet: each pair's condition type, sampled with its control mode and scored on its own
    types = validation_condition_types(cfg)
    if pairs:
        seed = cfg.seed if cfg.seed is not None else 0
        modes = [union_columns(cfg).index(name) for name in types] if types else None
        samples = generate(pipe, pairs, cfg.num_validation_images, seed, cfg.validation_inference_steps,
                           cfg.validation_guidance_scale, t.device, modes)
        warn_blank(samples, step)
        rows = [(condition_to_rgb(cond), imgs, prompt) for (cond, prompt), imgs in zip(pairs, samples)]
        grid = make_grid(rows)
        out = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        t.log_image("validation", grid, step)
        scores: dict[str, list[float]] = {}
        for i, ((cond, prompt), imgs) in enumerate(zip(pairs, samples)):
            metric_fn, prefix = (union_metric(cfg, types[i], t.metric_fn), f"{types[i]}/") if types else \
                (t.metric_fn, "")
            if metric_fn is None:
                continue
            cond_np = np.asarray(condition_to_rgb(cond))
            for image in imgs:
                for key, value in metric_fn(cond_np, prompt, np.asarray(image.convert("RGB"))).items():
                    scores.setdefault(prefix + key, []).append(float(value))
        metrics.update({f"validation/{k}": float(np.mean(v)) for k, v in scores.items()})
    if t.evaluator is not None:
        metrics.update(t.evaluator(step, pipe))
    if cfg.enable_model_cpu_offload:  # the hooks are on the live modules: remove them, and bring those back
        pipe.remove_all_hooks()
        for module in (controlnet, unet):
            module.to(t.device)
    t.encoders_release()
    del pipe
    return metrics


def union_metric(cfg, condition_type: str, default):
    """The controllability metric of one condition type of a union ControlNet: --validation_metric when given,
    else the metric of the type's name where there is one (a column named canny or depth), else none."""
    from zeroconv.evaluate.metrics import METRICS, get_metric

    if cfg.validation_metric:
        return default
    return get_metric(condition_type) if condition_type in METRICS else None
