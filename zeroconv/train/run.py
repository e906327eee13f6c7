"""`zeroconv train`: check (zeroconv.train.preflight), build the run, hand it to the loop, save the result."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from zeroconv.config import TrainConfig, parse, to_dict
from zeroconv.errors import EXIT_OK
from zeroconv.train.preflight import check_disk_space, preflight, tracker_names

logger = logging.getLogger("zeroconv.train")


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    """Everything the loop touches, built once by `setup`."""

    cfg: TrainConfig
    accelerator: Any
    base: Any
    controlnet: Any
    unet: Any
    encoders: Any
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    trainable_params: list
    generator: torch.Generator
    state: Any
    batches: Any
    max_train_steps: int
    weight_dtype: torch.dtype
    identity: dict
    validation_pairs: list
    dataset: Any = None
    metric_fn: Callable | None = None
    evaluator: Callable | None = None
    progress: Any = None
    stop_signal: signal.Signals | None = None
    metrics_log: list = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # logging ------------------------------------------------------------------------------------------------
    def log_step(self, values: dict) -> None:
        step = self.state.global_step
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                  sps=f"{values['samples_per_s']:.1f}")
        self.record(step, {f"train/{k}": v for k, v in values.items()})

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

    # checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        from zeroconv.train.checkpoint import save_checkpoint

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.cfg.output_dir, self.state.global_step, controlnet=self.accelerator.unwrap_model(self.controlnet),
                decoder_state=self.decoder_state(), optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                scaler=self.accelerator.scaler, generator=self.generator, state=self.state, identity=self.identity,
                config=to_dict(self.cfg), total_limit=self.cfg.checkpoints_total_limit)
            logger.info("checkpoint saved: %s", path)
        self.accelerator.wait_for_everyone()

    def decoder_state(self) -> dict | None:
        if self.cfg.sd_locked:
            return None
        from zeroconv.models.controlnet import DECODER_PREFIXES

        unet = self.accelerator.unwrap_model(self.unet)
        return {k: v for k, v in unet.state_dict().items() if k.startswith(DECODER_PREFIXES)}

    # validation ---------------------------------------------------------------------------------------------
    def validation_due(self, step: int) -> bool:
        has_work = bool(self.validation_pairs) or self.evaluator is not None
        return has_work and step % self.cfg.validation_steps == 0

    def validate(self) -> dict:
        from zeroconv.train.validate import run_validation

        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return {}
        metrics = run_validation(self, self.state.global_step)
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
        for module in (self.base.vae, self.base.text_encoder):
            module.to(self.device)

    def encoders_release(self) -> None:
        release = getattr(self.encoders, "release", None)
        if release is not None:
            release()


def resolve_mixed_precision(requested: str | None) -> str:
    if requested in (None, "no"):
        return requested or "no"
    if requested == "fp16" and not torch.cuda.is_available():
        logger.warning("--mixed_precision fp16 needs a GPU; training in fp32 on this CPU")
        return "no"
    return requested


def enable_memory_efficient_attention(cfg: TrainConfig, unet, controlnet) -> None:
    if not cfg.enable_xformers_memory_efficient_attention:
        return
    import importlib.util

    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        logger.warning("--enable_xformers_memory_efficient_attention: xformers %s; using PyTorch's scaled dot "
                       "product attention instead (as fast on recent PyTorch)",
                       "is not installed" if importlib.util.find_spec("xformers") is None else "needs a CUDA GPU")
        return
    unet.enable_xformers_memory_efficient_attention()
    controlnet.enable_xformers_memory_efficient_attention()


def compile_controlnet(controlnet) -> None:
    """torch.compile in place (state-dict keys and saving unchanged). Compilation happens at the first step; where
    it fails (no C++ compiler, an unsupported op) dynamo warns and runs that code eagerly instead of stopping."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    try:
        controlnet.compile()
    except Exception as exc:  # noqa: BLE001 - an optional speed-up must not stop training
        logger.warning("--compile: torch.compile unavailable (%s: %s); training uncompiled", type(exc).__name__, exc)


CHANNELS_LAST_MIN_LATENT = 32


def use_channels_last(requested: bool | None, resolution: int, vae_scale_factor: int) -> bool:
    """--channels_last as given, or when unset ("auto") on for latent grids of at least 32x32: on CPU it measured
    faster there (the 3-level base at 256 px) and not on 8x8 or 16x16 grids (the tiny and toy bases at 64 px)."""
    if requested is not None:
        return requested
    return resolution // vae_scale_factor >= CHANNELS_LAST_MIN_LATENT


def make_optimizer(cfg: TrainConfig, controlnet_params: list, decoder_params: list, lr_scale: float):
    groups = [{"params": controlnet_params, "lr": cfg.learning_rate * lr_scale}]
    if decoder_params:
        groups.append({"params": decoder_params, "lr": cfg.decoder_learning_rate * lr_scale})
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **adamw_implementation([p for g in groups for p in g["params"]]), **kwargs)


def adamw_implementation(params: list) -> dict:
    """fused=True where torch has a fused AdamW kernel for every parameter's device (CUDA, and CPU since torch
    2.4: one kernel per tensor instead of the foreach fallback's op-by-op loop; 2.4x faster on the bench's
    ControlNets, equal to the plain loop to 1 ulp); foreach=True elsewhere."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    if params and all(p.device.type in supported and p.dtype.is_floating_point for p in params):
        return {"fused": True}
    return {"foreach": True}


def run_identity(cfg: TrainConfig, base, controlnet) -> dict:
    """What a checkpoint must share with the run that resumes it, flat so a mismatch names the exact key."""
    identity = {"base": cfg.pretrained_model_name_or_path, "resolution": cfg.resolution, "sd_locked": cfg.sd_locked,
                "only_mid_control": cfg.only_mid_control, "conditioning_channels": cfg.conditioning_channels}
    for prefix, config in (("base_unet", base.unet.config), ("controlnet", controlnet.config)):
        for key, value in config.items():
            if not key.startswith("_"):
                identity[f"{prefix}.{key}"] = json.loads(json.dumps(value, default=str))
    return identity


def setup(cfg: TrainConfig, evaluator: Callable | None = None) -> Trainer:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import ControlNetModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from zeroconv.data.dataset import ControlNetDataset, collate
    from zeroconv.data.order import batches_per_epoch, epoch_batches
    from zeroconv.data.sources import load_examples
    from zeroconv.data.transforms import PairedTransform
    from zeroconv.models.base import load_base
    from zeroconv.models.controlnet import build_controlnet, decoder_parameters
    from zeroconv.train.checkpoint import TrainerState, check_identity, find_resume_checkpoint, load_checkpoint
    from zeroconv.train.inputs import LiveEncoders
    from zeroconv.train.loop import steps_for

    pairs = preflight(cfg)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=tracker_names(cfg.report_to) or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir)),
    )
    seed = cfg.seed if cfg.seed is not None else 0
    set_seed(seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # data first: a bad dataset should not cost a model load
    examples = load_examples(cfg)
    condition_fn = None
    if cfg.condition:
        from zeroconv.data.conditions import get_extractor

        condition_fn = get_extractor(cfg.condition, seed=seed)
    dataset = ControlNetDataset(examples, PairedTransform(cfg.resolution, cfg.conditioning_channels), seed=seed,
                                random_flip=cfg.random_flip, strict_data=cfg.strict_data, condition_fn=condition_fn)

    base = load_base(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant,
                     cache_dir=cfg.cache_dir, tokenizer_name=cfg.tokenizer_name)
    if cfg.controlnet_model_name_or_path:
        controlnet = ControlNetModel.from_pretrained(cfg.controlnet_model_name_or_path, cache_dir=cfg.cache_dir)
    else:
        controlnet = build_controlnet(base.unet, base.vae_scale_factor, cfg.conditioning_channels,
                                      cfg.condition_encoder_init)
    controlnet.train()
    enable_memory_efficient_attention(cfg, base.unet, controlnet)
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    if cfg.compile:
        compile_controlnet(controlnet)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet = base.unet
    decoder_params = []
    if not cfg.sd_locked:
        decoder_params = decoder_parameters(unet)
        for p in decoder_params:
            p.requires_grad_(True)
        unet.train()
    # frozen weights in the training dtype; trained ones keep fp32 master weights
    frozen_dtype = {unet: torch.float32 if decoder_params else weight_dtype, base.vae: weight_dtype,
                    base.text_encoder: weight_dtype}
    for module, dtype in frozen_dtype.items():
        module.to(accelerator.device)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    controlnet.to(accelerator.device)
    if use_channels_last(cfg.channels_last, cfg.resolution, base.vae_scale_factor):
        for module in (controlnet, unet):
            module.to(memory_format=torch.channels_last)

    lr_scale = (cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
                if cfg.scale_lr else 1.0)
    controlnet_params = [p for p in controlnet.parameters() if p.requires_grad]
    # weights + two AdamW moments, fp32, per kept checkpoint (one more while the next is written)
    checkpoint_bytes = 12 * sum(p.numel() for p in controlnet_params + decoder_params)
    check_disk_space(cfg.output_dir, checkpoint_bytes * ((cfg.checkpoints_total_limit or 1) + 1))
    optimizer = make_optimizer(cfg, controlnet_params, decoder_params, lr_scale)
    per_epoch = batches_per_epoch(len(dataset), cfg.train_batch_size, accelerator.num_processes)
    max_train_steps = steps_for(per_epoch, cfg.gradient_accumulation_steps, cfg.num_train_epochs,
                                cfg.max_train_steps)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_train_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    if decoder_params:
        controlnet, unet, optimizer = accelerator.prepare(controlnet, unet, optimizer)
    else:
        controlnet, optimizer = accelerator.prepare(controlnet, optimizer)

    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    identity = run_identity(cfg, base, accelerator.unwrap_model(controlnet))
    state = TrainerState()
    checkpoint = find_resume_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    if cfg.resume_from_checkpoint == "latest" and checkpoint is None:
        logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting fresh", cfg.output_dir)
    if checkpoint is not None:
        check_identity(checkpoint, identity)
        state = load_checkpoint(checkpoint, controlnet=accelerator.unwrap_model(controlnet),
                                unet=accelerator.unwrap_model(unet), optimizer=optimizer, lr_scheduler=lr_scheduler,
                                scaler=accelerator.scaler, generator=generator)
        logger.warning("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.global_step, state.epoch,
                       state.batches_in_epoch)

    if cfg.cache == "off":
        encoders = LiveEncoders(base.vae, base.text_encoder, base.tokenizer, accelerator.device, weight_dtype)
    else:  # the cache's latents and embeddings replace the images and captions; the encoders leave the device
        from zeroconv.data.cache import cached_training_inputs

        dataset, encoders, collate = cached_training_inputs(cfg, dataset, base, accelerator.device, weight_dtype,
                                                            seed)
    batches = epoch_batches(dataset, state, batch_size=cfg.train_batch_size, seed=seed,
                            num_workers=cfg.dataloader_num_workers, collate_fn=collate,
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            pin_memory=accelerator.device.type == "cuda")
    metric_name = cfg.validation_metric or (cfg.condition if cfg.condition else None)
    metric_fn = None
    if metric_name:
        from zeroconv.evaluate.metrics import METRICS, get_metric

        if metric_name in METRICS:
            metric_fn = get_metric(metric_name)
    trainer = Trainer(cfg=cfg, accelerator=accelerator, base=base, controlnet=controlnet, unet=unet,
                      encoders=encoders, noise_scheduler=base.noise_scheduler, optimizer=optimizer,
                      lr_scheduler=lr_scheduler, trainable_params=controlnet_params + decoder_params,
                      generator=generator, state=state, batches=batches, max_train_steps=max_train_steps,
                      weight_dtype=weight_dtype, identity=identity, validation_pairs=pairs, dataset=dataset, metric_fn=metric_fn,
                      evaluator=evaluator)
    if accelerator.is_main_process:
        from zeroconv.config import save_yaml

        save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))
    trainer.progress = tqdm(total=max_train_steps, initial=state.global_step, desc="train",
                            disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    logger.info("%d examples, %d optimizer steps, effective batch %d", len(dataset), max_train_steps,
                cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes)
    return trainer


def tracker_config(cfg: TrainConfig) -> dict:
    """Trackers take scalars only: lists become strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in to_dict(cfg).items()}


def save_final(t: Trainer) -> Path:
    """The trained ControlNet in diffusers layout in output_dir (and the trained decoder as a full UNet)."""
    out = Path(t.cfg.output_dir)
    t.accelerator.wait_for_everyone()
    if t.accelerator.is_main_process:
        t.accelerator.unwrap_model(t.controlnet).save_pretrained(out, safe_serialization=True)
        if not t.cfg.sd_locked:
            t.accelerator.unwrap_model(t.unet).save_pretrained(out / "unet_decoder", safe_serialization=True)
        summary = {"global_step": t.state.global_step, "skipped_samples": t.state.skipped_samples,
                   "nonfinite_steps": t.state.nonfinite_steps, "nonfinite_log": t.state.nonfinite_log,
                   "controllability": report_controllability(out / "metrics.jsonl")}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        write_card(t, out)
        if t.cfg.report:  # once more, so the page shows the finished run's counters
            from zeroconv.report import refresh_report

            refresh_report(out)
    t.accelerator.wait_for_everyone()
    return out


def report_controllability(metrics_file: Path) -> dict:
    """Print the validation metrics over steps and summarize each curve (baseline, best, when control appeared)."""
    from zeroconv.evaluate.curve import curves_from_rows, format_table, summarize

    if not metrics_file.is_file():
        return {}
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    curves = curves_from_rows(rows)
    if not curves:
        return {}
    print("controllability over training steps (validation set):\n" + format_table(curves), file=sys.stderr)
    summaries = {key: summarize(curve, key) for key, curve in curves.items()}
    for key, s in summaries.items():
        if s.get("baseline") is not None:
            appeared = (f"control appeared at step {s['control_appeared_at']}" if s["control_appeared_at"]
                        else "no gain over the base yet")
            print(f"{key}: base alone {s['baseline']:.3f} -> best {s['best']:.3f} at step {s['best_step']}; "
                  f"{appeared}", file=sys.stderr)
    return summaries


def write_card(t: Trainer, out: Path) -> None:
    try:
        from zeroconv.card import write_model_card
    except ImportError:
        return
    cfg = t.cfg
    validation = {k: v for row in t.metrics_log for k, v in row.items() if k.startswith("validation/")}
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    write_model_card(out, {
        "base_model": cfg.pretrained_model_name_or_path,
        "condition": cfg.condition or cfg.conditioning_image_column,
        "dataset": cfg.dataset_name or cfg.train_data_dir,
        "steps": t.state.global_step,
        "effective_batch": cfg.train_batch_size * cfg.gradient_accumulation_steps * t.accelerator.num_processes,
        "resolution": cfg.resolution,
        "controllability": validation,
        "validation_grid": str(grids[-1].relative_to(out)) if grids else None,
        "sd_locked": cfg.sd_locked,
        "only_mid_control": cfg.only_mid_control,
    })


def install_signal_handlers(t: Trainer):
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 128+signal. Second Ctrl-C: exit at once."""

    def handler(signum, _frame):
        if t.stop_signal is not None and signum == signal.SIGINT:
            os._exit(128 + signum)
        t.stop_signal = signal.Signals(signum)
        if t.progress is not None:
            t.progress.write(f"{t.stop_signal.name}: finishing this step and writing a checkpoint "
                             "(Ctrl-C again to quit at once)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def train(cfg: TrainConfig, evaluator: Callable | None = None) -> int:
    """Train a ControlNet as `cfg` says; returns the exit code. `evaluator(step, pipeline) -> dict` adds metrics
    to every validation."""
    from zeroconv.train.loop import train_loop

    if cfg.cache == "only":
        from zeroconv.data.cache import build_for_training

        logger.info("latent cache ready: %s", build_for_training(cfg).folder)
        return EXIT_OK
    t = setup(cfg, evaluator)
    restore_signals = install_signal_handlers(t)
    try:
        measures_control = t.metric_fn is not None or t.evaluator is not None
        if t.state.global_step == 0 and cfg.validation_baseline and measures_control and t.validation_due(0):
            t.validate()  # step 0: the base alone, the curve's baseline
        code = train_loop(t)
        t.progress.close()
        if code == EXIT_OK:
            if t.validation_due(t.state.global_step) is False and (t.validation_pairs or t.evaluator):
                t.validate()  # the final weights always get a grid and metrics
            save_final(t)
            if cfg.push_to_hub:
                from zeroconv.export import push_folder

                push_folder(cfg.output_dir, cfg.hub_model_id or Path(cfg.output_dir).resolve().name, cfg.hub_token)
        if t.state.skipped_samples:
            logger.warning("%d unreadable samples were skipped and replaced", t.state.skipped_samples)
        return code
    finally:
        restore_signals()
        t.accelerator.end_training()


def main(argv: list[str] | None = None) -> int:
    cfg = parse(TrainConfig, argv, prog="zeroconv train",
                description="Train a ControlNet on a Stable Diffusion 1.x/2.x base. Accepts every flag of diffusers' "
                "examples/controlnet/train_controlnet.py with the same meaning.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("accelerate", "diffusers", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return train(cfg)

