"""The toy base: a small Stable Diffusion model zeroconv trains itself and ships, so the demo needs no download.

It is SD in miniature, in diffusers layout: an AutoencoderKL (64 px images, 4x down to 16x16x4 latents), a
CLIP text encoder with an offline CLIP tokenizer, a cross-attention UNet2DConditionModel and SD's noise
schedule. `zeroconv toy-base train` pretrains it on captioned images of one colored shape ("red circle with navy
background", squares, triangles, diamonds, at random sizes and places; zeroconv.data.synth.shapes_example), in
two stages: the autoencoder on pixels, then UNet and text encoder together on the autoencoder's latents. So it
knows colors and shapes from the prompt, but nothing tells it where to put them: that is the ControlNet's job.

`toy_base_path()` is the shipped folder; `zeroconv toy-base path` prints it.

A run is resumable: it checkpoints into DIR/.progress (after the autoencoder stage, every --checkpoint_every UNet
steps and after the last one), and the same command with the same --out continues from the last complete
checkpoint, bit-exactly as if it had not stopped (tests/models/test_toy_base.py). Any other option is refused.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zeroconv.config import option, parse
from zeroconv.durable import fsync_dir, fsync_tree
from zeroconv.errors import UserError

TOY_BASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_base"
RESOLUTION = 64
VAE_SCALE_FACTOR = 4
MAX_PROMPT_TOKENS = 32


def toy_base_path() -> Path:
    """The folder of the shipped toy base (diffusers layout, loads with StableDiffusionPipeline.from_pretrained)."""
    if not (TOY_BASE_DIR / "model_index.json").is_file():
        raise UserError(f"the toy base is missing from {TOY_BASE_DIR}; reinstall zeroconv, or make it with "
                        f"`zeroconv toy-base train --out {TOY_BASE_DIR}`")
    return TOY_BASE_DIR


# ---------------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------------

def vocabulary() -> list[str]:
    from zeroconv.data.synth import CSS_WORDS, SHAPES

    return sorted(set(CSS_WORDS) | set(SHAPES) | {"with", "background", "a", "an", "and", "on", "in"})


def build_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 3,  # three blocks: two 2x downsamplings, 64 px -> 16x16
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=(16, 32, 64),  # narrow at full resolution, where convolutions cost the most
        layers_per_block=1,
        latent_channels=4,
        # GroupNorm takes its statistics over each image, which hides a flat image's absolute color; one group
        # keeps all channels together, and with it the colors came right after about 1000 steps here.
        norm_num_groups=1,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,  # flat shapes need no global attention; it would only cost time
    )
    # Start the posterior nearly deterministic (std ~0.007): with SD's tiny KL weight the encoder would otherwise
    # spend most of a short training shrinking a unit variance that drowns the latent in noise.
    with torch.no_grad():
        logvar = slice(vae.config.latent_channels, None)
        vae.quant_conv.weight[logvar] = 0.0
        vae.quant_conv.bias[logvar] = -10.0
    return vae


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // VAE_SCALE_FACTOR,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    # SD 1.x's betas, rescaled to zero terminal SNR, with v-prediction and "trailing" timesteps (Lin et al. 2023,
    # "Common Diffusion Noise Schedules and Sample Steps are Flawed"). SD's own schedule leaves a trace of the
    # image's mean color in its noisiest step, so a model trained on it reads the color from that trace and, when
    # sampling starts from pure noise, draws muddy mixed colors: on flat-colored shapes that is every image. At
    # zero terminal SNR the last step is pure noise in training too, so the colors must come from the prompt.
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing")


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ToyBaseConfig:
    action: str = option("path", "'train' a toy base into --out, or print the 'path' of the shipped one.",
                         choices=["train", "path"])
    out: str | None = option(None, "Output folder of `train` (a diffusers SD folder).")
    seed: int = option(0, "Seed of the data, the weights and the noise.")
    num_images: int = option(10000, "Captioned shape images drawn for training.")
    vae_steps: int = option(1800, "Autoencoder training steps.")
    unet_steps: int = option(7300, "UNet + text encoder training steps (the shipped base's: about 4 h on 2 CPU cores).")
    vae_batch_size: int = option(16, "Autoencoder batch size.")
    batch_size: int = option(32, "UNet + text encoder batch size.")
    vae_learning_rate: float = option(1e-3, "Autoencoder learning rate.")
    learning_rate: float = option(5e-4, "UNet and text encoder learning rate (cosine decay after warm-up).")
    caption_dropout: float = option(0.1, "Fraction of captions replaced by '' so classifier-free guidance works.")
    ema_decay: float = option(0.999, "Decay of the UNet and text encoder weight average that is saved.")
    offset_noise: float = option(
        0.0, "Std of a per-image, per-channel constant added to the training noise (the older fix for flat colors; "
        "the zero-terminal-SNR schedule of the toy base makes it unnecessary).")
    vae_from: str | None = option(None, "Reuse the autoencoder of an earlier toy base folder instead of training one.")
    unet_from: str | None = option(None, "Continue from the UNet and text encoder of an earlier toy base folder "
                                   "(same tokenizer words) instead of fresh weights.")
    snr_gamma: float = option(
        0.0, "Min-SNR loss weighting gamma (0 turns it off). Off by default: its v-prediction form weighs the "
        "pure-noise step, where the prompt alone decides the colors, by zero.")
    threads: int = option(0, "Torch CPU threads; 0 keeps torch's default.")
    checkpoint_every: int = option(
        200, "UNet steps between the checkpoints in --out/.progress (one is also made after the autoencoder stage "
        "and after the last step); re-running the same command continues from the last one. 0: only those two.")


def draw_training_set(num_images: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`num_images` shape images (N, 64, 64, 3) uint8 and their captions."""
    from tqdm.auto import tqdm

    from zeroconv.data.synth import shapes_example

    images = np.empty((num_images, RESOLUTION, RESOLUTION, 3), np.uint8)
    captions = []
    for i in tqdm(range(num_images), desc="draw shapes", unit="img", dynamic_ncols=True):
        images[i], caption = shapes_example(seed, i, RESOLUTION, palette="distinct")
        captions.append(caption)
    return images, captions


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def warmup_cosine(optimizer, steps: int):
    """Linear warm-up over the first 5% of steps (at most 200), then cosine decay to zero."""
    warmup = max(1, min(200, steps // 20))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int, lr: float, generator: torch.Generator,
              crop: int = RESOLUTION // 2) -> None:
    """Reconstruction (MSE) with SD's small KL weight: a near-deterministic autoencoder with a smooth latent.

    It trains on random `crop`-pixel crops (on the latent grid): the autoencoder is convolutional (no attention), so
    what it learns on crops holds on whole images, at a quarter of the cost."""
    from tqdm.auto import tqdm

    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    cells = (RESOLUTION - crop) // VAE_SCALE_FACTOR + 1
    bar = tqdm(range(steps), desc="train autoencoder", dynamic_ncols=True)
    for _ in bar:
        index = torch.randint(0, len(images), (batch_size,), generator=generator).numpy()
        y, x = (torch.randint(0, cells, (2,), generator=generator) * VAE_SCALE_FACTOR).tolist()
        pixels = to_pixels(images[index, y:y + crop, x:x + crop])
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and std of every image (the UNet stage draws fresh latent samples from them)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(to_pixels(images[start:start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


class WeightAverage:
    """An exponential moving average of parameters, copied into the model before saving."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short runs are not dominated by the initial weights
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def descend(loss: torch.Tensor, params, optimizer, schedule, average: WeightAverage, step: int, bar) -> None:
    """One optimizer step of a toy base's training (the UNet here, the toy SD3/Flux transformers in toy_flow):
    backward, clip to norm 1, step, schedule, average; the loss on the bar every 10 steps."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    average.update(step)
    if step % 10 == 0:
        bar.set_postfix(loss=f"{loss.item():.4f}")


def train_unet(unet, text_encoder, tokenizer, means, stds, scaling_factor: float, captions: list[str],
               cfg: ToyBaseConfig, generator: torch.Generator, resume: Path | None = None,
               checkpoint=None) -> None:
    """SD's denoising objective in v-prediction form, UNet and text encoder trained together, captions dropped for CFG.

    `resume`: a UNet-stage checkpoint whose optimizer, schedule and average continue here (the weights and the
    generators are already restored). `checkpoint(step, optimizer, schedule, average)` is called after step
    `step` (counted from 1) every --checkpoint_every steps and after the last one."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from tqdm.auto import tqdm

    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    ids = tokenizer(captions + [""], max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    empty_ids, ids = ids[-1], ids[:-1]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, cfg.unet_steps)
    average = WeightAverage(params, cfg.ema_decay)
    start = load_unet_stage(resume, optimizer, schedule, average) if resume else 0
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, cfg.unet_steps), desc="train unet + text encoder", dynamic_ncols=True, initial=start,
               total=cfg.unet_steps)
    for step in bar:
        index = torch.randint(0, len(means), (cfg.batch_size,), generator=generator)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        latents = latents * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        if cfg.offset_noise > 0:
            noise = noise + cfg.offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,),
                                  generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        batch_ids = ids[index]
        dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        batch_ids[dropped] = empty_ids
        embeds = text_encoder(batch_ids, return_dict=False)[0]
        pred = unet(noisy, timesteps, embeds, return_dict=False)[0]
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:  # min-SNR weighting in its v-prediction form (Hang et al. 2023): finite at SNR 0
            snr = compute_snr(noise_scheduler, timesteps)
            loss = loss * torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1)
        descend(loss.mean(), params, optimizer, schedule, average, step, bar)
        done = step + 1
        if checkpoint and (done == cfg.unet_steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            checkpoint(done, optimizer, schedule, average)
    average.copy_to_model()
    unet.eval()
    text_encoder.eval()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (resume)
# ---------------------------------------------------------------------------------------------------------------
# zeroconv.train.checkpoint does this for ControlNets; models/ sits below train/ (pyproject's layers), so the toy
# base keeps its own small copy of that scheme.

PROGRESS = ".progress"
COMPLETE = "COMPLETE"
FINISHED = "finished.json"
STOP_ENV = "ZEROCONV_TEST_STOP_AFTER_CHECKPOINT"


class StoppedForTest(RuntimeError):
    """Raised after the checkpoint named by $ZEROCONV_TEST_STOP_AFTER_CHECKPOINT is in place: a kill, for tests."""


def run_options(cfg: ToyBaseConfig) -> dict:
    """What a continued run must share with the one it continues: every option but the action and --out."""
    return {k: getattr(cfg, k) for k in ToyBaseConfig.__dataclass_fields__ if k not in ("action", "out")}


def complete_checkpoints(out: Path) -> list[Path]:
    """DIR/.progress/step-N folders with their COMPLETE marker, oldest first."""
    progress = out / PROGRESS
    if not progress.is_dir():
        return []
    found = [(int(d.name[5:]), d) for d in progress.iterdir()
             if d.name.startswith("step-") and d.name[5:].isdigit() and (d / COMPLETE).is_file()]
    return [d for _, d in sorted(found)]


def check_same_run(saved: dict, cfg: ToyBaseConfig, what: str) -> None:
    now = run_options(cfg)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k, "(absent)") != now.get(k, "(absent)"))
    if differ:
        details = "; ".join(f"--{k} {saved.get(k, '(absent)')} there, {now.get(k, '(absent)')} now" for k in differ)
        raise UserError(f"--out {cfg.out} holds {what} made with other options ({details}); re-run with its options "
                        "to continue it, or give a new --out to start another run")


def save_checkpoint(out: Path, step: int, *, vae, unet, text_encoder, generator: torch.Generator,
                    cfg: ToyBaseConfig, progress: dict, optimizer=None, schedule=None, average=None) -> Path:
    """Write DIR/.progress/step-{step} atomically, then delete the older ones.

    Everything goes into a hidden tmp folder, every file is fsynced, the COMPLETE marker is written last, then one
    os.replace puts it in place: a save killed at any point leaves only a tmp folder, which nothing loads. The
    previous checkpoint is deleted only after that, so one complete checkpoint always exists. Step 0 is the one
    after the autoencoder stage (no optimizer yet: the UNet stage has not begun)."""
    from safetensors.torch import save_file

    root = out / PROGRESS
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / f"{name}.safetensors")
    if average is not None:
        save_file({f"{i:05d}": s.contiguous() for i, s in enumerate(average.shadow)}, tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(schedule.state_dict(), tmp / "schedule.pt")
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()}, tmp / "rng.pt")
    state = {**progress, "step": step, "threads": torch.get_num_threads(), "options": run_options(cfg)}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    (tmp / COMPLETE).write_text(f"step {step}\n")
    fsync_tree(tmp)
    if final.exists():  # only if a run re-saves a step it already saved; never the case in one run
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in complete_checkpoints(out)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):  # of saves killed midway, by this run's earlier sittings
        if not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)
    if os.environ.get(STOP_ENV) == str(step):
        raise StoppedForTest(f"stopped after the checkpoint of step {step} (${STOP_ENV})")
    return final


def load_checkpoint(checkpoint: Path, *, vae, unet, text_encoder, generator: torch.Generator) -> dict:
    """Restore the weights and every generator `save_checkpoint` wrote; returns its state.json."""
    from safetensors.torch import load_file

    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        model.load_state_dict(load_file(checkpoint / f"{name}.safetensors"), strict=True)
    rng = torch.load(checkpoint / "rng.pt", weights_only=False)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return json.loads((checkpoint / "state.json").read_text())


def load_unet_stage(checkpoint: Path, optimizer, schedule, average: WeightAverage) -> int:
    """Restore the optimizer, LR schedule and weight average of a UNet-stage checkpoint; returns its step."""
    from safetensors.torch import load_file

    shadow = load_file(checkpoint / "ema.safetensors")
    if len(shadow) != len(average.shadow):
        raise UserError(f"{checkpoint}/ema.safetensors: {len(shadow)} averaged tensors, the model has "
                        f"{len(average.shadow)}; it was made by another zeroconv, give a new --out")
    with torch.no_grad():
        for i, s in enumerate(average.shadow):
            s.copy_(shadow[f"{i:05d}"])
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))
    schedule.load_state_dict(torch.load(checkpoint / "schedule.pt", weights_only=False))
    return json.loads((checkpoint / "state.json").read_text())["step"]


def finish_progress(out: Path, cfg: ToyBaseConfig, progress: dict) -> None:
    """Replace the checkpoints (tens of MB, with .pt files the shipped folder must not hold) by a 1 KB record, so
    re-running a finished command says so instead of training it all again."""
    root = out / PROGRESS
    tmp = root / f".tmp-{FINISHED}-{os.getpid()}"
    tmp.write_text(json.dumps({**progress, "options": run_options(cfg)}, indent=1))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / FINISHED)
    fsync_dir(root)
    for leftover in [*root.glob(".tmp-*"), *root.glob("step-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def train_toy_base(cfg: ToyBaseConfig, command: str | None = None) -> Path:
    """Train a toy base into cfg.out as the module docstring says, or continue the run there; returns the folder."""
    from zeroconv.models.tokenizer import write_clip_tokenizer

    if not cfg.out:
        raise UserError("--out is required: the folder to write the toy base into")
    out = Path(cfg.out)
    for flag in ("num_images", "vae_steps", "unet_steps", "vae_batch_size", "batch_size"):
        if getattr(cfg, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if cfg.checkpoint_every < 0:
        raise UserError("--checkpoint_every must be 0 or more")
    # refused before anything slow, so a wrong option costs a second, not a stage
    finished = out / PROGRESS / FINISHED
    if finished.is_file():
        check_same_run(json.loads(finished.read_text())["options"], cfg, "a finished toy-base run")
        print(f"{out} already holds this run, finished; nothing to do (give a new --out to train it again)")
        return out
    checkpoints = complete_checkpoints(out)
    resume = checkpoints[-1] if checkpoints else None
    if resume:
        check_same_run(json.loads((resume / "state.json").read_text())["options"], cfg, "an unfinished toy-base run")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    images, captions = draw_training_set(cfg.num_images, cfg.seed)
    # every part is built before any training, so a mistake fails in seconds and not after the first stage
    if cfg.vae_from:
        from diffusers import AutoencoderKL

        if not (Path(cfg.vae_from) / "vae" / "config.json").is_file():
            raise UserError(f"--vae_from {cfg.vae_from}: no vae/config.json; give a toy base folder")
        vae = AutoencoderKL.from_pretrained(cfg.vae_from, subfolder="vae")
    else:
        vae = build_vae()
    tokenizer = write_clip_tokenizer(out / "tokenizer", vocabulary(), model_max_length=MAX_PROMPT_TOKENS)
    if cfg.unet_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        if not (Path(cfg.unet_from) / "unet" / "config.json").is_file():
            raise UserError(f"--unet_from {cfg.unet_from}: no unet/config.json; give a toy base folder")
        text_encoder = CLIPTextModel.from_pretrained(cfg.unet_from, subfolder="text_encoder")
        unet = UNet2DConditionModel.from_pretrained(cfg.unet_from, subfolder="unet")
    else:
        text_encoder = build_text_encoder(tokenizer)
        unet = build_unet()
    # The models are built as a fresh run builds them (same classes, same attention code), then take the saved
    # weights: loading them another way could pick other kernels and break the bit-exact continuation.
    progress = {"seconds": 0.0, "vae_seconds": 0.0, "sittings": 1}
    if resume:
        state = load_checkpoint(resume, vae=vae, unet=unet, text_encoder=text_encoder, generator=generator)
        progress = {"seconds": state["seconds"], "vae_seconds": state["vae_seconds"],
                    "sittings": state["sittings"] + 1}
        print(f"continuing from step {state['step']} of {cfg.unet_steps} (the checkpoint in {resume}), "
              f"sitting {progress['sittings']}")
        if state["threads"] != torch.get_num_threads():
            print(f"warning: the run so far used {state['threads']} torch threads, this sitting "
                  f"{torch.get_num_threads()}; CPU results can differ in the last bits across thread counts "
                  f"(OMP_NUM_THREADS={state['threads']} matches it; --threads is an option, so it must stay as it was)")
    earlier = progress["seconds"]

    def elapsed() -> float:
        return earlier + time.perf_counter() - start

    def checkpoint(step, optimizer=None, schedule=None, average=None):
        progress["seconds"] = elapsed()
        save_checkpoint(out, step, vae=vae, unet=unet, text_encoder=text_encoder, generator=generator, cfg=cfg,
                        progress=progress, optimizer=optimizer, schedule=schedule, average=average)

    if not resume:
        if not cfg.vae_from:
            train_vae(vae, images, cfg.vae_steps, cfg.vae_batch_size, cfg.vae_learning_rate, generator)
        vae.eval()
        progress["vae_seconds"] = elapsed()
        checkpoint(0)  # the autoencoder stage is never trained twice
    vae.eval()
    means, stds = encode_all(vae, images)
    # SD's convention: latents are scaled to unit variance before diffusion
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))

    unet_resume = resume if resume and json.loads((resume / "state.json").read_text())["step"] > 0 else None
    train_unet(unet, text_encoder, tokenizer, means, stds, vae.config.scaling_factor, captions, cfg, generator,
               resume=unet_resume, checkpoint=checkpoint)
    save_pipeline(out, vae, text_encoder, tokenizer, unet)
    progress["seconds"] = elapsed()
    write_card(out, cfg, command or "zeroconv toy-base train " + " ".join(
        f"--{k} {'DIR' if k == 'out' else getattr(cfg, k)}"
        for k in ("out", "seed", "num_images", "vae_steps", "unet_steps")),
        progress["seconds"], progress["vae_seconds"], progress["sittings"])
    finish_progress(out, cfg, progress)
    return out


def folder_megabytes(folder: Path) -> float:
    """The model's size: the card is written while the last checkpoint is still in .progress."""
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and PROGRESS not in p.relative_to(folder).parts) / 1e6


def write_card(out: Path, cfg: ToyBaseConfig, command: str, seconds: float, vae_seconds: float,
               sittings: int = 1) -> None:
    threads = torch.get_num_threads()
    config = run_options(cfg)
    if sittings == 1:
        sittings_line, wall_note = "One command, in one sitting:", ""
    else:
        sittings_line = (f"One command, run in {sittings} sittings: it was stopped and the same command re-run, "
                         "which continued from its own checkpoints (bit-exact with an uninterrupted run: "
                         "tests/models/test_toy_base.py::test_stopped_run_continues_bit_exactly). The wall time "
                         "sums the sittings, each up to its last checkpoint, so steps lost to a stop and trained "
                         "again count once:")
        wall_note = f" in all, {sittings} sittings"
    card = f"""# zeroconv toy base

A small Stable Diffusion model (diffusers layout: AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel, SD 1.x betas rescaled to zero terminal SNR, v-prediction) that zeroconv trained itself, so `zeroconv demo` and the tests need
no download. It draws one colored shape on a colored background at {RESOLUTION} px from prompts such as
"red circle with navy background"; it knows the colors and the shapes but not where to place them.

- Images {RESOLUTION}x{RESOLUTION}, latents {RESOLUTION // VAE_SCALE_FACTOR}x{RESOLUTION // VAE_SCALE_FACTOR}x4 \
(autoencoder {VAE_SCALE_FACTOR}x down): a ControlNet's condition encoder needs \
{int(math.log2(VAE_SCALE_FACTOR))} stride-2 convs.
- Training data: {cfg.num_images} images of one shape (circle half the time, else square, triangle or diamond) in
  one of 16 CSS colors on another (zeroconv.data.synth.shapes_example, palette "distinct"), captioned
  "<color> <shape> with <color> background".
- Stage 1: autoencoder, {"reused, see below" if cfg.vae_from else f"{cfg.vae_steps} steps"}. Stage 2: UNet and text encoder together, {cfg.unet_steps} steps{" more, from an earlier run (below)" if cfg.unet_from else ""},
  caption dropout {cfg.caption_dropout}, offset noise {cfg.offset_noise}, min-SNR gamma {cfg.snr_gamma}, EMA {cfg.ema_decay} (the saved weights).

## How it was made

{sittings_line}

```
{command}
```

- seed: {cfg.seed}
- wall time: {seconds / 60:.1f} min{wall_note} (autoencoder {vae_seconds / 60:.1f} min), {threads} torch threads on
  {platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}
- options: `{json.dumps(config)}`
- size on disk: {folder_megabytes(out):.1f} MB
"""
    for folder in dict.fromkeys(f for f in (cfg.unet_from, cfg.vae_from) if f):  # each earlier run once
        earlier = Path(folder) / "README.md"
        if earlier.is_file():
            made = earlier.read_text().split("## How it was made", 1)[-1].strip().replace("\n## ", "\n### ")
            card += f"\n## Started from {folder}, made this way\n\n{made}\n"
    (out / "README.md").write_text(card)


def public_argv(argv: list[str]) -> list[str]:
    """argv with --out's folder shown as DIR: the card is published, the folder is a path on one machine."""
    shown, hide_next = [], False
    for arg in argv:
        if hide_next:
            shown.append("DIR")
            hide_next = False
        elif arg == "--out":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--out="):
            shown.extend(["--out", "DIR"])
        else:
            shown.append(arg)
    return shown


def main(argv: list[str] | None = None) -> int:
    cfg = parse(ToyBaseConfig, argv, prog="zeroconv toy-base", positional=("action",),
                description="Train the small toy SD base zeroconv ships (train), or print where it is (path).")
    if cfg.action == "path":
        print(toy_base_path())
        return 0
    command = "zeroconv toy-base " + " ".join(shlex.quote(a) for a in public_argv(
        argv if argv is not None else sys.argv[1:]))
    out = train_toy_base(cfg, command)
    print(f"toy base written to {out} ({folder_megabytes(out):.1f} MB)")
    return 0
