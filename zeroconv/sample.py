"""`zeroconv sample`: base + ControlNet + condition image(s) + prompt(s) -> PNGs (and a samples.jsonl record).

Pairs come from --image/--prompt (diffusers' pairing rule: equal counts, or one of either), from a folder of
condition images (--folder, one --prompt for all, or a .txt beside each image), or from a JSONL of
{"condition": path, "prompt": text} lines (--jsonl). Image k of every pair uses seed + k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from zeroconv.config import option, parse
from zeroconv.errors import UserError
from zeroconv.jsonl import read_rows
from zeroconv.models.dtypes import DTYPES
from zeroconv.models.pipeline import SCHEDULERS, load_controlnet

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class SampleConfig:
    controlnet: str | None = option(None, "Trained ControlNet: a diffusers folder (a zeroconv output_dir), a "
                                    "checkpoint-N folder, or a hub id. Required.")
    pretrained_model_name_or_path: str | None = option(
        None, "Base model (folder, hub id, single file, or 'toy'; SD 1.x/2.x, SDXL, SD3/SD3.5 or Flux.1, whose family "
        "decides the pipeline). Default: the base recorded in the ControlNet's training config.")
    image: list[str] | None = option(None, "Condition image(s).")
    prompt: list[str] | None = option(None, "Prompt(s).")
    folder: str | None = option(None, "A folder of condition images (prompt from --prompt or a .txt beside each).")
    jsonl: str | None = option(None, "A JSONL file of {\"condition\": path, \"prompt\": text} lines.")
    out: str = option("samples", "Output folder for PNGs and samples.jsonl.")
    negative_prompt: str | None = option(None, "Negative prompt.")
    num_images: int = option(1, "Images per (condition, prompt) pair.")
    steps: int = option(20, "Denoising steps.")
    guidance_scale: float = option(7.5, "Classifier-free guidance scale (the paper uses 9.0).")
    controlnet_conditioning_scale: float = option(1.0, "Multiplier of the ControlNet residuals.")
    guess_mode: bool = option(False, "Guess mode: control on the conditional branch only, residuals scaled "
                              "0.825**(12-i); use with an empty prompt.")
    scheduler: str = option("unipc", "Sampler.", choices=list(SCHEDULERS))
    seed: int = option(0, "Seed; image k of each pair uses seed + k.")
    resolution: int | None = option(None, "Output size (square). Default: the training resolution, else 512.")
    device: str | None = option(None, "cuda, cpu, mps... Default: cuda if available, else cpu.")
    dtype: str = option("auto", "Weights dtype: auto (fp16 on CUDA, fp32 elsewhere), fp16, bf16, fp32.",
                        choices=["auto", "fp16", "bf16", "fp32"])
    control_mode: str | None = option(
        None, "Union ControlNets (required for one, refused for a plain one): the condition type of every --image, a "
        "column name of the training run's --conditioning_image_columns (read from its config.yaml) or a control "
        "mode number (mode k is column k).")


def collect_pairs(cfg: SampleConfig) -> list[tuple[str, str]]:
    from zeroconv.config import validation_pairs

    if cfg.jsonl:
        path = Path(cfg.jsonl)
        if not path.is_file():
            raise UserError(f"--jsonl {path}: no such file")
        expected = 'expected {"condition": path, "prompt": text}'
        pairs = []
        for n, row in read_rows(path, f"--jsonl {path}", expected):
            try:
                cond = Path(row["condition"])
                pairs.append((str(cond if cond.is_absolute() else path.parent / cond), row.get("prompt", "")))
            except (KeyError, TypeError):
                raise UserError(f"--jsonl {path} line {n}: {expected}") from None
    elif cfg.folder:
        folder = Path(cfg.folder)
        if not folder.is_dir():
            raise UserError(f"--folder {folder}: no such folder")
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"--folder {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        pairs = []
        for image in images:
            caption = image.with_suffix(".txt")
            if caption.is_file():
                prompt = caption.read_text().strip()
            elif cfg.prompt and len(cfg.prompt) == 1:
                prompt = cfg.prompt[0]
            else:
                raise UserError(f"--folder {folder}: {image.name} has no .txt caption beside it; give one --prompt")
            pairs.append((str(image), prompt))
    else:
        if not cfg.image:
            raise UserError("give condition images with --image, --folder or --jsonl")
        pairs = validation_pairs(cfg.prompt or [""], cfg.image)
    for image, _ in pairs:
        if not Path(image).is_file():
            raise UserError(f"condition image {image}: no such file")
    return pairs


def resolve_control_mode(requested: str | None, types: int, trained: dict) -> dict:
    """The pipeline's control_mode argument: {} for a plain ControlNet, {"control_mode": k} for a union one."""
    columns = [c.strip() for c in (trained.get("conditioning_image_columns") or "").split(",") if c.strip()]
    if not types:
        if requested is not None:
            raise UserError(f"--control_mode {requested}: this ControlNet is a plain one (one condition type); "
                            "drop --control_mode")
        return {}
    named = f" ({', '.join(f'{k} = {name}' for k, name in enumerate(columns))})" if columns else ""
    if requested is None:
        raise UserError(f"--control_mode is required: this is a union ControlNet of {types} condition types{named}; "
                        "give the type of the condition images")
    if requested in columns:
        return {"control_mode": columns.index(requested)}
    if requested.isdigit() and int(requested) < types:
        return {"control_mode": int(requested)}
    raise UserError(f"--control_mode {requested}: not a condition type of this union ControlNet; give a number from "
                    f"0 to {types - 1}{named}")


def read_training_config(controlnet: str) -> dict:
    """The config of the run that trained this ControlNet, if it is a zeroconv output (or checkpoint) folder."""
    import yaml

    path = Path(controlnet)
    for candidate in (path / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from zeroconv.data.transforms import load_condition
    from zeroconv.models.base import check_base_arg, load_base
    from zeroconv.models.union import union_types

    cfg = parse(SampleConfig, argv, prog="zeroconv sample", description=__doc__)
    if not cfg.controlnet:
        raise UserError("--controlnet is required (a trained ControlNet folder)")
    if not Path(cfg.controlnet).exists():
        check_base_arg(cfg.controlnet, flag="--controlnet")
    trained = read_training_config(cfg.controlnet)
    base_name = cfg.pretrained_model_name_or_path or trained.get("pretrained_model_name_or_path")
    if not base_name:
        raise UserError("--pretrained_model_name_or_path is required: the ControlNet folder does not record its base")
    check_base_arg(base_name)
    resolution = cfg.resolution or trained.get("resolution") or 512
    if resolution % 8:
        raise UserError(f"--resolution {resolution}: must be divisible by 8")
    pairs = collect_pairs(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(cfg.dtype, torch.float16 if device.startswith("cuda") else torch.float32)

    # loaded in the dtype they sample in, then only moved: a cast after loading is what diffusers warns about
    same_base = base_name == trained.get("pretrained_model_name_or_path")
    # the VAE the ControlNet was trained with (--pretrained_vae_model_name_or_path), when sampling on that base
    base = load_base(base_name, dtype=dtype, vae=trained.get("pretrained_vae_model_name_or_path") if same_base else None)
    if trained.get("max_sequence_length"):  # SD3/Flux: the T5 length it was trained and validated with
        base.max_sequence_length = trained["max_sequence_length"]
    controlnet = load_controlnet(cfg.controlnet, base.family, dtype)
    mode = resolve_control_mode(cfg.control_mode, union_types(controlnet), trained)
    # SD's ControlNets read the condition's pixels in 1, 3 or 4 channels; SD3's and Flux's its RGB latents
    channels = controlnet.config.get("conditioning_channels", 3)
    pipe = base.family.pipeline(base, controlnet, scheduler=cfg.scheduler).to(device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with tqdm(total=len(pairs) * cfg.num_images, desc="sample") as bar:
        for i, (image_path, prompt) in enumerate(pairs):
            cond = load_condition(image_path, resolution, channels).to(device, dtype)
            for k in range(cfg.num_images):
                generator = torch.Generator(device="cpu").manual_seed(cfg.seed + k)
                image = pipe(prompt, image=cond, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                             negative_prompt=cfg.negative_prompt, generator=generator,
                             controlnet_conditioning_scale=cfg.controlnet_conditioning_scale,
                             guess_mode=cfg.guess_mode, height=resolution, width=resolution, **mode).images[0]
                name = f"{i:05d}_{k}.png"
                image.save(out / name)
                records.append({"image": name, "condition": str(Path(image_path).resolve()), "prompt": prompt,
                                "seed": cfg.seed + k, **mode})
                bar.update(1)
    with open(out / "samples.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{len(records)} images written to {out}")
    return 0
