"""Validation during training: sample from the live modules with fixed seeds, save a grid, score control.

A validation never kills training: any error (out of memory included) is logged and the run goes on. It runs
inside a forked RNG so a run with validation resumes to the same weights as one without.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from zeroconv.errors import UserError

logger = logging.getLogger("zeroconv.validate")

def validation_pairs(prompts: list[str] | None, images: list[str] | None) -> list[tuple[str, str]]:
    """diffusers' pairing rule: equal counts pair up; a single prompt or image is used with all of the other."""
    if not prompts and not images:
        return []
    if not prompts or not images:
        missing = "--validation_prompt" if not prompts else "--validation_image"
        given = "--validation_image" if not prompts else "--validation_prompt"
        raise UserError(f"{given} is set but {missing} is not; give both (one of either, or equal counts)")
    if len(images) == len(prompts):
        return list(zip(images, prompts))
    if len(images) == 1:
        return [(images[0], p) for p in prompts]
    if len(prompts) == 1:
        return [(i, prompts[0]) for i in images]
    raise UserError(f"{len(prompts)} --validation_prompt and {len(images)} --validation_image do not pair up: give "
                    "equal counts, or one of either")


def load_condition(path: str | Path, resolution: int, channels: int) -> torch.Tensor:
    """A conditioning image as the ControlNet sees it in training: [1, C, R, R] in [0, 1]."""
    from zeroconv.data.transforms import PairedTransform, to_condition_mode, to_tensor

    with Image.open(path) as image:
        condition = PairedTransform(resolution, channels).fit(to_condition_mode(image, channels))
    return to_tensor(condition).unsqueeze(0)


def condition_to_rgb(cond: torch.Tensor) -> Image.Image:
    array = (cond[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(array[..., :3])


def make_grid(rows: list[tuple[Image.Image, list[Image.Image], str]], caption_height: int = 14) -> Image.Image:
    """One row per (condition, samples, prompt): condition | samples, prompt written underneath."""
    size = rows[0][0].size[0]
    columns = 1 + max(len(samples) for _, samples, _ in rows)
    grid = Image.new("RGB", (columns * size, len(rows) * (size + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (condition, samples, prompt) in enumerate(rows):
        y = r * (size + caption_height)
        for c, image in enumerate([condition, *samples]):
            grid.paste(image.convert("RGB").resize((size, size)), (c * size, y))
        draw.text((2, y + size + 1), prompt[: columns * size // 6], fill="black")
    return grid


def generate(pipe, pairs_with_conditions, num_images: int, seed: int, steps: int, guidance: float, device):
    """Samples for each (condition tensor, prompt); image k of every pair uses seed + k."""
    results = []
    for cond, prompt in pairs_with_conditions:
        samples = []
        for k in range(num_images):
            generator = torch.Generator(device="cpu").manual_seed(seed + k)
            out = pipe(prompt, image=cond.to(device), num_inference_steps=steps, guidance_scale=guidance,
                       generator=generator, height=cond.shape[-2], width=cond.shape[-1])
            samples.append(out.images[0])
        results.append(samples)
    return results


def run_validation(t, step: int) -> dict[str, float]:
    """Grid PNG + tracker image + controllability metrics for the current weights. Never raises."""
    try:
        with torch.random.fork_rng(devices=[t.device] if t.device.type == "cuda" else []), torch.no_grad():
            return _run_validation(t, step)
    except Exception as exc:  # noqa: BLE001 - validation must never kill a run
        logger.error("validation at step %d failed, training goes on: %s: %s", step, type(exc).__name__, exc)
        return {}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run_validation(t, step: int) -> dict[str, float]:
    from zeroconv.models.pipeline import build_pipeline

    cfg = t.cfg
    controlnet = t.accelerator.unwrap_model(t.controlnet)
    unet = t.accelerator.unwrap_model(t.unet)
    t.encoders_to_device()  # a cached run keeps the VAE and text encoder off the device until now
    # the live modules, in the dtypes training holds them in: nothing is copied or cast for a validation
    pipe = build_pipeline(t.base, controlnet, unet=unet)
    metrics: dict[str, float] = {}
    pairs = [(load_condition(path, cfg.resolution, cfg.conditioning_channels), prompt)
             for path, prompt in t.validation_pairs]
    if pairs:
        seed = cfg.seed if cfg.seed is not None else 0
        samples = generate(pipe, pairs, cfg.num_validation_images, seed, cfg.validation_inference_steps,
                           cfg.validation_guidance_scale, t.device)
        rows = [(condition_to_rgb(cond), imgs, prompt) for (cond, prompt), imgs in zip(pairs, samples)]
        grid = make_grid(rows)
        out = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        t.log_image("validation", grid, step)
        if t.metric_fn is not None:
            scores: dict[str, list[float]] = {}
            for (cond, prompt), imgs in zip(pairs, samples):
                cond_np = np.asarray(condition_to_rgb(cond))
                for image in imgs:
                    for key, value in t.metric_fn(cond_np, prompt, np.asarray(image.convert("RGB"))).items():
                        scores.setdefault(key, []).append(float(value))
            metrics.update({f"validation/{k}": float(np.mean(v)) for k, v in scores.items()})
    if t.evaluator is not None:
        metrics.update(t.evaluator(step, pipe))
    t.encoders_release()
    del pipe
    return metrics
