"""The training loop. Everything it needs is built by zeroconv.train.setup; this file only trains.

One iteration is one optimizer step: fetch the micro-batches, forward, backward, check the result is finite,
clip, step, log, checkpoint, validate.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time

import torch
import torch.nn.functional as F

from zeroconv.errors import EXIT_NONFINITE, EXIT_OK
from zeroconv.models.draws import sample_generators
from zeroconv.train.inputs import drop_captions, micro_conditioning

logger = logging.getLogger("zeroconv.train")


def compute_loss(t, batch, generators=None) -> torch.Tensor:
    """The family's denoising loss with the ControlNet's residuals added to the frozen denoiser. Every random draw
    of a sample comes from its own generator, seeded by (seed, step, sample index): the same on any number of
    processes (zeroconv.models.draws); `generators` replaces them (tests)."""
    family, step = t.base.family, t.state.global_step
    if generators is None:
        generators = sample_generators(t.seed, step, batch["index"].tolist(), t.device)
    latents = t.encoders.latents(batch, generators).float()
    noisy_latents, timesteps, target, weights = family.noisy_batch(t.noise_scheduler, latents, generators,
                                                                   t.noise_recipe.at_step(step))
    # --proportion_empty_prompts (default 0, as diffusers; the paper's 0.5) teaches reading the condition alone.
    prompts = drop_captions(t.encoders.prompts(batch), t.encoders.empty_prompts, t.cfg.proportion_empty_prompts,
                            generators)
    micro = micro_conditioning(batch, (t.cfg.crops_coords_top_left_h, t.cfg.crops_coords_top_left_w))
    cond = batch["conditioning_pixel_values"].to(t.device, non_blocking=True)
    # a union ControlNet: which condition types each sample was given (the dataset's draw), [B, K] on the CPU
    union = {"control_types": batch["control_types"]} if "control_types" in batch else {}
    control = family.encode_condition(t.base, cond, generators, **union)  # SD: the pixels; SD3: their VAE latents
    with t.accelerator.autocast():
        pred = family.denoise(t.unet, t.controlnet, noisy_latents, timesteps, prompts, control, micro.to(t.device),
                              only_mid_control=t.cfg.only_mid_control, guidance=t.cfg.guidance_scale, **union)
    if weights is None:
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:  # --snr_gamma: each sample's mean squared error weighted by its noise level
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        loss = (per_sample * weights).mean()
    if t.consistency is not None:  # --consistency_loss_weight: does the one-step image follow its condition?
        loss = loss + t.consistency(t, noisy_latents, timesteps, pred, cond)
    return loss


def train_loop(t) -> int:
    """Optimizer steps from t.state.global_step to t.max_train_steps. Returns the process exit code."""
    cfg, state, accelerator = t.cfg, t.state, t.accelerator
    loss_sum, loss_count, tick, samples = torch.zeros((), device=t.device), 0, time.perf_counter(), 0
    while state.global_step < t.max_train_steps:
        # fetch, forward, backward: gradient_accumulation_steps micro-batches make one step
        step_loss = torch.zeros((), device=t.device)
        for micro in range(cfg.gradient_accumulation_steps):
            fetch = time.perf_counter()
            batch = next(t.batches)
            t.seconds["data"] += time.perf_counter() - fetch  # host time waiting for data: no device sync
            state.skipped_samples += int(batch["skipped"])
            last = micro == cfg.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else held_back_sync(t):
                loss = compute_loss(t, batch) / cfg.gradient_accumulation_steps
                accelerator.backward(loss)
            step_loss += loss.detach()
            samples += len(batch["index"]) * accelerator.num_processes
        # finite check and clip: a NaN/inf loss or gradient skips the update and leaves the weights untouched
        grad_norm = accelerator.clip_grad_norm_(t.trainable_params, cfg.max_grad_norm)
        finite = torch.isfinite(step_loss)
        if accelerator.scaler is None and grad_norm is not None:  # fp16: the grad scaler skips inf steps itself;
            # None: DeepSpeed clipped (and stepped) inside the backward. FSDP's norm is a replicated DTensor
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=finite.device))
        finite, stop = agree(accelerator, finite, t.stop_signal is not None)  # the one host sync of a step
        if finite:
            t.optimizer.step()
            if t.ema is not None:
                t.ema.update()
            state.nonfinite_in_a_row = 0
            loss_sum += step_loss
            loss_count += 1
        else:
            state.nonfinite_steps += 1
            state.nonfinite_in_a_row += 1
            state.nonfinite_log.append(state.global_step + 1)
            logger.warning("step %d: non-finite loss or gradient norm, update skipped (%d in a row)",
                           state.global_step + 1, state.nonfinite_in_a_row)
        t.lr_scheduler.step()
        t.optimizer.zero_grad(set_to_none=cfg.set_grads_to_none)
        state.global_step += 1
        t.progress.update(1)

        # log: the loss is read back from the device only here, averaged over the processes (every rank logs at the
        # same steps and agreed on the same finite steps, so all take part in the reduction)
        if state.global_step % cfg.logging_steps == 0 or state.global_step == t.max_train_steps:
            elapsed = time.perf_counter() - tick
            mean_loss = (accelerator.reduce(loss_sum / loss_count, reduction="mean").item() if loss_count
                         else float("nan"))
            t.log_step({"loss": mean_loss, "lr": t.lr_scheduler.get_last_lr()[0],
                        "samples_per_s": samples / max(elapsed, 1e-9), "skipped_samples": state.skipped_samples,
                        "nonfinite_steps": state.nonfinite_steps})
            loss_sum, loss_count, tick, samples = torch.zeros((), device=t.device), 0, time.perf_counter(), 0

        if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            t.save_checkpoint()  # the weights are still those of the last good step
            logger.error("stopping: %d non-finite steps in a row, the last at step %d; the last good state is in "
                         "the checkpoint. Lower --learning_rate, check the data, or try --mixed_precision bf16",
                         state.nonfinite_in_a_row, state.global_step)
            return EXIT_NONFINITE
        if state.global_step % cfg.checkpointing_steps == 0:
            t.save_checkpoint()
        if t.validation_due(state.global_step):
            t.validate()
        if stop:
            t.save_checkpoint()
            signum = t.stop_signal or signal.SIGTERM  # another process may have been the one signalled
            logger.warning("received %s: checkpoint of step %d written; resume with --resume_from_checkpoint "
                           "latest", signum.name, state.global_step)
            return 128 + int(signum)
    return EXIT_OK


def held_back_sync(t) -> contextlib.ExitStack:
    """DDP's gradient all-reduce of every trained module (the ControlNet, and the UNet decoder with --sd_locked
    false) held back for a micro-batch that is not a step's last: one all-reduce per optimizer step."""
    stack = contextlib.ExitStack()
    for module in (t.controlnet,) if t.cfg.sd_locked else (t.controlnet, t.unet):
        stack.enter_context(t.accelerator.no_sync(module))
    return stack


def agree(accelerator, finite: torch.Tensor, stop: bool) -> tuple[bool, bool]:
    """Every process takes the same branch: skip if any saw a non-finite value, stop if any was signalled.
    Otherwise one process would wait forever for the others at the next collective."""
    if accelerator.num_processes == 1:
        return bool(finite), stop
    flags = torch.stack([(~finite.bool()).float(), torch.tensor(float(stop), device=finite.device)])
    flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0] == 0), bool(flags[1] > 0)


def steps_for(num_batches_per_epoch: int, accumulation: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of the run: --max_train_steps, else epochs x ceil(batches / accumulation)."""
    if max_steps is not None:
        return max_steps
    return epochs * math.ceil(num_batches_per_epoch / accumulation)
