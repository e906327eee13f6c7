"""`zeroconv train`: check (zeroconv.train.preflight), build the run (zeroconv.train.setup), hand it to the loop
(zeroconv.train.loop), save the result (zeroconv.train.finish)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from zeroconv.config import TrainConfig, parse, to_dict
from zeroconv.errors import EXIT_OK
from zeroconv.models.base import Base
from zeroconv.models.noise import NoiseRecipe
from zeroconv.train.checkpoint import TrainerState
from zeroconv.train.inputs import CachedEncoders, LiveEncoders
from zeroconv.train.preflight import preflight

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import ControlNetModel, SchedulerMixin
    from tqdm.auto import tqdm

    from zeroconv.train.consistency import ConsistencyReward
    from zeroconv.train.ema import ControlNetEMA

logger = logging.getLogger("zeroconv.train")


@dataclass
class TrainingRun:
    """One training run: everything the loop touches, built once by zeroconv.train.setup.build_parts. `controlnet`
    and `unet` are as accelerate prepared them (unwrap_model gives the modules)."""

    cfg: TrainConfig
    accelerator: Accelerator
    base: Base
    controlnet: ControlNetModel | torch.nn.Module
    unet: torch.nn.Module
    encoders: LiveEncoders | CachedEncoders
    noise_scheduler: SchedulerMixin
    noise_recipe: NoiseRecipe
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable_params: list[torch.nn.Parameter]
    ema: ControlNetEMA | None
    consistency: ConsistencyReward | None
    seed: int  # of the data order and of every sample's draws (zeroconv.models.draws)
    state: TrainerState
    batches: Iterator[dict]
    max_train_steps: int
    weight_dtype: torch.dtype
    identity: dict
    validation_pairs: list[tuple[str, str]]
    dataset: torch.utils.data.Dataset
    metric_fn: Callable | None = None
    evaluator: Callable | None = None
    progress: tqdm | None = None
    stop_signal: signal.Signals | None = None
    metrics_log: list[dict] = field(default_factory=list)
    # wall seconds: from the process start to a built run, the step-0 validation, waiting for batches (within the
    # steps), the loop (steps, checkpoints, validations); in train_summary.json, read by bench/race.py
    seconds: dict = field(default_factory=lambda: {"startup": 0.0, "baseline": 0.0, "data": 0.0, "steps": 0.0})

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def log_step(self, values: dict) -> None:
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                  sps=f"{values['samples_per_s']:.1f}")
        self.record(self.state.global_step, {f"train/{k}": v for k, v in values.items()})

    def record(self, step: int, values: dict) -> None:
        """Tracker + output_dir/metrics.jsonl (main process), the run's own record of every figure."""
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            row = {"step": step, **values}
            self.metrics_log.append(row)
            with open(Path(self.cfg.output_dir) / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def log_image(self, tag: str, image, step: int) -> None:
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({tag: [wandb.Image(image)]}, step=step)

    def save_checkpoint(self) -> None:
        from zeroconv.train.checkpoint import save_checkpoint, save_sharded_checkpoint
        from zeroconv.train.engines import gathered_copy, is_sharded

        self.accelerator.wait_for_everyone()
        if is_sharded(self.accelerator):  # every process writes its shard (zeroconv.train.checkpoint)
            path = save_sharded_checkpoint(
                self.accelerator, self.cfg.output_dir, self.state.global_step,
                controlnet=gathered_copy(self.accelerator, self.controlnet), lr_scheduler=self.lr_scheduler,
                state=self.state, identity=self.identity, config=to_dict(self.cfg),
                total_limit=self.cfg.checkpoints_total_limit, ema=self.ema)
            logger.info("checkpoint saved: %s", path)
            return
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.cfg.output_dir, self.state.global_step, controlnet=self.accelerator.unwrap_model(self.controlnet),
                decoder_state=self.decoder_state(), optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                scaler=self.accelerator.scaler, state=self.state, identity=self.identity,
                config=to_dict(self.cfg), total_limit=self.cfg.checkpoints_total_limit, ema=self.ema)
            logger.info("checkpoint saved: %s", path)
        self.accelerator.wait_for_everyone()

    def full_controlnet(self) -> ControlNetModel | None:
        """The ControlNet's whole weights as a module, on the main process (None on the others): the unwrapped
        module itself, or under DeepSpeed/FSDP a gathered plain copy, for which every process must call this."""
        from zeroconv.train.engines import gathered_copy, is_sharded

        if is_sharded(self.accelerator):
            return gathered_copy(self.accelerator, self.controlnet)
        return self.accelerator.unwrap_model(self.controlnet) if self.accelerator.is_main_process else None

    def averaged(self, controlnet: ControlNetModel | None) -> contextlib.AbstractContextManager:
        """With --use_ema, the average in `controlnet` (what full_controlnet gave) for the duration, else
        `controlnet` as it is. Every process must enter it: under FSDP the average's shards are gathered."""
        return self.ema.applied(controlnet) if self.ema is not None else contextlib.nullcontext(controlnet)

    def decoder_state(self) -> dict | None:
        if self.cfg.sd_locked:
            return None
        unet = self.accelerator.unwrap_model(self.unet)
        return {k: v for k, v in unet.state_dict().items() if k.startswith(self.base.family.decoder_prefixes)}

    def validation_due(self, step: int) -> bool:
        has_work = bool(self.validation_pairs) or self.evaluator is not None
        return has_work and step % self.cfg.validation_steps == 0

    def validate(self) -> dict:
        from zeroconv.train.validate import run_validation

        controlnet = self.full_controlnet()  # under DeepSpeed/FSDP a gather: every process first
        metrics = {}
        with self.averaged(controlnet) as controlnet:  # --use_ema samples the average (under FSDP gathered too)
            if self.accelerator.is_main_process:
                self.base.materialize()  # a cached run's text encoders load at its first validation, not before
                metrics = run_validation(self, self.state.global_step, controlnet)
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return {}
        if metrics:
            self.record(self.state.global_step, metrics)
            shown = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in metrics.items())
            self.progress.write(f"step {self.state.global_step}: {shown}")
        if self.cfg.report:
            from zeroconv.report import refresh_report

            refresh_report(self.cfg.output_dir)
        self.accelerator.wait_for_everyone()
        return metrics

    def encoders_to_device(self) -> None:
        for module in self.base.family.frozen_encoders(self.base):
            module.to(self.device)

    def encoders_release(self) -> None:
        release = getattr(self.encoders, "release", None)
        if release is not None:
            release()


def setup(cfg: TrainConfig, evaluator: Callable | None = None) -> TrainingRun:
    """Check `cfg`, then build the run. `evaluator(step, pipeline) -> dict` adds metrics to every validation."""
    from zeroconv.train.setup import build_parts

    return TrainingRun(**build_parts(cfg, preflight(cfg), evaluator))


def seconds_since_process_start() -> float:
    import time

    import psutil

    return time.time() - psutil.Process().create_time()


def install_signal_handlers(run: TrainingRun):
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 128+signal. Second Ctrl-C: exit at once."""

    def handler(signum, _frame):
        if run.stop_signal is not None and signum == signal.SIGINT:
            os._exit(128 + signum)
        run.stop_signal = signal.Signals(signum)
        if run.progress is not None:
            run.progress.write(f"{run.stop_signal.name}: finishing this step and writing a checkpoint "
                               "(Ctrl-C again to quit at once)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def train(cfg: TrainConfig, evaluator: Callable | None = None) -> int:
    """Train a ControlNet as `cfg` says; returns the exit code. `evaluator(step, pipeline) -> dict` adds metrics
    to every validation."""
    from zeroconv.train.finish import save_final
    from zeroconv.train.loop import train_loop

    if cfg.cache == "only":
        from zeroconv.train.cache import build_for_training

        logger.info("latent cache ready: %s", build_for_training(cfg).folder)
        return EXIT_OK
    run = setup(cfg, evaluator)
    restore_signals = install_signal_handlers(run)
    run.seconds["startup"] = seconds_since_process_start()
    try:
        measures_control = run.metric_fn is not None or run.evaluator is not None
        if run.state.global_step == 0 and cfg.validation_baseline and measures_control and run.validation_due(0):
            run.validate()  # step 0: the base alone, the curve's baseline
        run.seconds["baseline"] = seconds_since_process_start() - run.seconds["startup"]
        code = train_loop(run)
        run.seconds["steps"] = seconds_since_process_start() - run.seconds["startup"] - run.seconds["baseline"]
        run.progress.close()
        if code == EXIT_OK:
            if run.validation_due(run.state.global_step) is False and (run.validation_pairs or run.evaluator):
                run.validate()  # the final weights always get a grid and metrics
            save_final(run)
            if cfg.push_to_hub:
                from zeroconv.hub import push_folder

                push_folder(cfg.output_dir, cfg.hub_model_id or Path(cfg.output_dir).resolve().name, cfg.hub_token)
        if run.state.skipped_samples:
            logger.warning("%d unreadable samples were skipped and replaced", run.state.skipped_samples)
        return code
    finally:
        restore_signals()
        run.accelerator.end_training()


def main(argv: list[str] | None = None) -> int:
    cfg = parse(TrainConfig, argv, prog="zeroconv train",
                description="Train a ControlNet on a Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5 or Flux.1 base (the "
                "family is read from the base). Accepts every flag of diffusers' examples/controlnet/train_controlnet.py "
                "with the same meaning, and the own flags of its _sdxl, _sd3 and _flux scripts.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("accelerate", "diffusers", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return train(cfg)
