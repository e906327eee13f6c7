"""The run's parts, built once: accelerator, dataset, base, ControlNet, dtypes, optimizer, schedule, resume state,
and the step's inputs (live encoders or the latent cache).

`zeroconv cache` (zeroconv.train.cache) builds its dataset, base and dtype with the functions here too, so the
cache it writes is the one `zeroconv train --cache auto` looks for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch

from zeroconv.config import TrainConfig, save_yaml, to_dict, union_columns, union_weights
from zeroconv.data.cache import LatentCache
from zeroconv.data.dataset import ControlNetDataset
from zeroconv.data.shards import is_shard_folder
from zeroconv.data.sources import STREAMED_CONDITION, Examples, ShardExamples
from zeroconv.data.stream import StreamDataset
from zeroconv.errors import UserError
from zeroconv.models.base import Base
from zeroconv.models.dtypes import resolve_mixed_precision, weight_dtype
from zeroconv.models.noise import NoiseRecipe
from zeroconv.train.host_memory import keep_freed_host_memory
from zeroconv.train.preflight import Checked, check_disk_space, tracker_names

logger = logging.getLogger("zeroconv.train")


# ----------------------------------------------------------------------------------------------------------------
# Shared with `zeroconv cache`
# ----------------------------------------------------------------------------------------------------------------

def run_seed(cfg: TrainConfig) -> int:
    return cfg.seed if cfg.seed is not None else 0


def make_accelerator(cfg: TrainConfig, tracking: bool = True):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    if not tracking:
        return Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cfg.resolution))
    # DDP waits for a gradient of every parameter unless told some may have none: --only_mid_control leaves the
    # down-block zero convs out of the loss, and a union step may leave out a condition type's parts
    unused = DistributedDataParallelKwargs(find_unused_parameters=cfg.only_mid_control or bool(union_columns(cfg)))
    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cfg.resolution),
        # the other processes wait at a barrier while the main one validates: give them --ddp_timeout, not torch's
        kwargs_handlers=[unused, InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.ddp_timeout))],
        log_with=tracker_names(cfg.report_to) or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir)),
    )


def build_dataset(cfg: TrainConfig, examples: Examples, seed: int) -> ControlNetDataset:
    from zeroconv.data.transforms import PairedTransform

    if isinstance(examples, ShardExamples):  # no random access: train and `zeroconv cache` use build_stream
        raise TypeError(f"{examples.index.where} is streamed: its dataset is build_stream's, not build_dataset's")
    condition_fn = None
    if cfg.condition:
        from zeroconv.data.conditions import get_extractor

        condition_fn = get_extractor(cfg.condition, seed=seed)
    transform = PairedTransform(cfg.resolution, cfg.conditioning_channels, random_crop=cfg.random_crop,
                                interpolation=cfg.image_interpolation_mode)
    buckets = bucket_of = None
    if cfg.aspect_buckets is not None:
        from zeroconv.config import parse_aspect_buckets
        from zeroconv.data.buckets import assign_buckets

        buckets = parse_aspect_buckets(cfg.aspect_buckets, cfg.resolution)
        bucket_of = assign_buckets(examples, buckets)
    union = dict(union_weights=union_weights(cfg), union_extra_probability=cfg.union_extra_condition_probability) \
        if union_columns(cfg) else {}
    return ControlNetDataset(examples, transform, seed=seed, random_flip=cfg.random_flip, strict_data=cfg.strict_data,
                             condition_fn=condition_fn, buckets=buckets, bucket_of=bucket_of, **union)


def build_stream(cfg: TrainConfig, examples: ShardExamples, seed: int, accelerator) -> StreamDataset:
    """The streamed dataset of webdataset shards or --streaming parquet files for this rank: build_dataset's
    transform, draws and condition over samples that come from the shards (zeroconv.data.stream)."""
    return StreamDataset(examples.index, build_dataset(cfg, [], seed), seed=seed, batch_size=cfg.train_batch_size,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         num_workers=cfg.dataloader_num_workers, shuffle_buffer=cfg.shuffle_buffer)


def check_stream_resume(state, dataset: StreamDataset, checkpoint: Path | None) -> None:
    """A mid-epoch position of a streamed run means something only with the layout it was counted in; record the
    layout for the next checkpoint."""
    layout = dataset.layout()
    if checkpoint is not None and state.batches_in_epoch and state.stream != layout:
        differ = sorted(k for k in set(state.stream) | set(layout) if state.stream.get(k) != layout.get(k))
        details = "; ".join(f"{k}: checkpoint {state.stream.get(k)!r} vs now {layout.get(k)!r}" for k in differ)
        raise UserError(f"--resume_from_checkpoint {checkpoint}: its stream position (epoch {state.epoch}, batch "
                        f"{state.batches_in_epoch}) was counted in another stream layout ({details}); resume with the "
                        "same shards, processes, --dataloader_num_workers, --train_batch_size and --shuffle_buffer, "
                        "or from a checkpoint at an epoch's end")
    state.stream = layout


def load_frozen_base(cfg: TrainConfig, dtype: torch.dtype | None = None) -> Base:
    from zeroconv.models.base import load_base

    # A run the latent cache may serve loads its text encoders only when it needs them: to build the cache, to
    # encode live after all, or to validate. T5 alone is 9 GB of SD3's and Flux's 'frozen parts'.
    base = load_base(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant,
                     cache_dir=cfg.cache_dir, tokenizer_name=cfg.tokenizer_name, dtype=dtype,
                     vae=cfg.pretrained_vae_model_name_or_path, defer_text_encoders=may_use_cache(cfg))
    base.upcast_vae = cfg.upcast_vae
    if cfg.max_sequence_length is not None:  # else the family's default, which load_base set
        base.max_sequence_length = cfg.max_sequence_length
    return base


def frozen_dtypes(base: Base, dtype: torch.dtype) -> dict:
    """The frozen encoders and the dtype each runs in: `dtype`, except a VAE its family keeps in float32."""
    return {**{module: dtype for module in base.family.frozen_encoders(base)},
            base.vae: base.family.vae_dtype(base, dtype)}


def latent_cache(cfg: TrainConfig, dataset: ControlNetDataset | StreamDataset, base: Base, device: torch.device,
                 dtype: torch.dtype) -> LatentCache:
    """The cache of `dataset` through `base`'s encoders in `dtype`: reused when complete, else built (a streamed
    one: a cache shard per data shard, each data shard read once, in order)."""
    from zeroconv.data import cache
    from zeroconv.models.locate import resolve_base

    identity = cache.cache_identity(
        dataset, cache.base_identity(resolve_base(cfg.pretrained_model_name_or_path), cfg.revision, base,
                                     cfg.pretrained_vae_model_name_or_path),
        cfg.tokenizer_name, cfg.condition, dtype)
    for module, module_dtype in frozen_dtypes(base, dtype).items():
        module.to(device)
        if module.dtype != module_dtype:  # `zeroconv cache` loads all in `dtype`; diffusers warns on every cast
            module.to(dtype=module_dtype)
    def encode_prompts(captions: list[str]) -> dict[str, torch.Tensor]:
        base.materialize()  # only a cache being built encodes: a complete one leaves the text encoders unloaded
        return base.family.encode_prompts(base, captions, device)

    encoders = cache.Encoders(base.vae, encode_prompts, base.family.prompt_shape(base), device, dtype,
                              cfg.train_batch_size, prompt_batch_size=cfg.dataset_preprocess_batch_size)
    return cache.open_or_build(cfg.latent_cache_dir or cache.default_cache_root(), identity, dataset, encoders,
                               flipped=cfg.random_flip, strict_data=cfg.strict_data,
                               num_workers=cfg.dataloader_num_workers)


def cache_cannot_serve(cfg: TrainConfig) -> str | None:
    """Why no latent cache can serve this run whatever --cache says (check_train_config, and for a stream
    zeroconv.data.sources.refuse_for_stream, refuse on/only for these, so only auto meets them), or None."""
    if cfg.random_crop:
        return "--random_crop moves the crop every epoch and a cache holds one"
    if cfg.aspect_buckets is not None:
        return "--aspect_buckets gives latents of varying shapes and a cache holds one square crop per image"
    if union_columns(cfg):
        return "--conditioning_image_columns gives several conditions per image and a cache holds one"
    if cfg.condition and (cfg.streaming or is_shard_folder(cfg.train_data_dir or cfg.dataset_name)):
        return STREAMED_CONDITION
    return None


def may_use_cache(cfg: TrainConfig) -> bool:
    """Whether usable_cache can return a cache for this run (it may still fall back to live encoding)."""
    return cfg.cache != "off" and cache_cannot_serve(cfg) is None


def usable_cache(cfg: TrainConfig, dataset: ControlNetDataset | StreamDataset, base: Base, device: torch.device,
                 dtype: torch.dtype) -> LatentCache | None:
    """The run's latent cache per --cache, or None to encode live. The default, auto, never stops a run: where a
    cache cannot serve it, one line says why and training goes on uncached."""
    from zeroconv.data.cache import CacheUnavailable

    if cfg.cache == "off":
        return None
    why = cache_cannot_serve(cfg)
    if why:
        logger.warning("--cache auto: off for this run, %s; batches are encoded live", why)
        return None
    try:
        return latent_cache(cfg, dataset, base, device, dtype)
    except CacheUnavailable as why:
        if cfg.cache != "auto":
            raise UserError(f"--cache {cfg.cache}: the latent cache cannot be built: {why}; pass --latent_cache_dir "
                            "on a disk with room, or --cache off") from None
        logger.warning("--cache auto: training uncached, the latent cache cannot be built: %s (--latent_cache_dir "
                       "elsewhere uses one, --cache off silences this)", why)
        return None


# ----------------------------------------------------------------------------------------------------------------
# Speed and memory options
# ----------------------------------------------------------------------------------------------------------------

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


def enable_npu_flash_attention(cfg: TrainConfig, unet, controlnet) -> None:
    if not cfg.enable_npu_flash_attention:
        return
    from diffusers.utils import is_torch_npu_available

    if not is_torch_npu_available():
        logger.warning("--enable_npu_flash_attention: no Ascend NPU (torch_npu) here; ignored, using PyTorch's "
                       "scaled dot product attention")
        return
    unet.enable_npu_flash_attention()
    controlnet.enable_npu_flash_attention()


def compile_controlnet(controlnet) -> None:
    """torch.compile in place (state-dict keys and saving unchanged). Compilation happens at the first step; where
    it fails (no C++ compiler, an unsupported op) dynamo warns and runs that code eagerly instead of stopping."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    try:
        controlnet.compile()
    except Exception as exc:  # noqa: BLE001 - an optional speed-up must not stop training
        logger.warning("--compile: torch.compile unavailable (%s: %s); training uncompiled", type(exc).__name__, exc)


CHANNELS_LAST_MIN_GRID = 32


def channels_last_modules(requested: bool | None, resolution: int, base, controlnet, unet,
                          engine: str | None = None) -> list:
    """The modules --channels_last puts in channels_last. None under FSDP, which refuses parameters that are not
    contiguous ("does not support non-contiguous parameters"), as channels_last weights are not. Otherwise all of
    the ControlNet and UNet when given; unset ("auto"), each part judged by the grid it runs on, on from 32x32. On
    CPU it measured faster there (the 3-level base at 256 px: latent grids of 32x32) and not on 8x8 or 16x16
    latent grids (the tiny and toy bases at 64 px), where the ControlNet's condition encoder still runs on the
    64x64 pixels: channels_last made it 1.2-1.6x faster forward and backward, and the tiny base's steps 1.2-1.5x
    in whole runs (bench/RESULTS.md)."""
    if engine == "FSDP":
        if requested:
            logger.warning("--channels_last: FSDP shards contiguous parameters only; training in the default layout")
        return []
    if requested is not None:
        return [controlnet, unet] if requested else []
    if resolution // base.vae_scale_factor >= CHANNELS_LAST_MIN_GRID:
        return [controlnet, unet]
    if resolution >= CHANNELS_LAST_MIN_GRID:
        return base.family.pixel_grid_modules(controlnet)
    return []


def make_optimizer(cfg: TrainConfig, controlnet_params: list, decoder_params: list, lr_scale: float):
    groups = [{"params": controlnet_params, "lr": cfg.learning_rate * lr_scale}]
    if decoder_params:
        groups.append({"params": decoder_params, "lr": cfg.decoder_learning_rate * lr_scale})
    if cfg.use_adafactor:  # train_controlnet_flux.py's settings: a fixed learning rate, no parameter scaling
        from transformers import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate * lr_scale, scale_parameter=False, relative_step=False,
                         weight_decay=cfg.adam_weight_decay)
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


# ----------------------------------------------------------------------------------------------------------------
# The run's parts
# ----------------------------------------------------------------------------------------------------------------

def run_identity(cfg: TrainConfig, base: Base, controlnet) -> dict:
    """What a checkpoint must share with the run that resumes it, flat so a mismatch names the exact key."""
    identity = {"base": cfg.pretrained_model_name_or_path, "resolution": cfg.resolution, "sd_locked": cfg.sd_locked,
                "only_mid_control": cfg.only_mid_control, "conditioning_channels": cfg.conditioning_channels}
    # what makes each sample's latents: another VAE, crop, filter or bucket set trains on other data. Recorded only
    # when not at the default, so checkpoints written before these keys existed still resume.
    for key, value, default in (("vae", cfg.pretrained_vae_model_name_or_path, None),
                                ("random_crop", cfg.random_crop, False),
                                ("image_interpolation_mode", cfg.image_interpolation_mode, "bilinear"),
                                ("aspect_buckets", cfg.aspect_buckets, None),
                                ("conditioning_image_columns", cfg.conditioning_image_columns, None),
                                ("union_condition_weights", cfg.union_condition_weights, None),
                                ("union_extra_condition_probability", cfg.union_extra_condition_probability, 0.0)):
        if value != default:
            identity[key] = value
    for prefix, config in (("base_unet", base.unet.config), ("controlnet", controlnet.config)):
        for key, value in config.items():
            if not key.startswith("_"):
                identity[f"{prefix}.{key}"] = json.loads(json.dumps(value, default=str))
    return identity


def noise_recipe(cfg: TrainConfig, max_train_steps: int) -> NoiseRecipe:
    return NoiseRecipe(cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.snr_gamma,
                       weighting_scheme=cfg.weighting_scheme, mode_scale=cfg.mode_scale,
                       precondition_outputs=cfg.precondition_outputs,
                       switch_step=round(cfg.timestep_switch_fraction * max_train_steps))


def tracker_config(cfg: TrainConfig) -> dict:
    """Trackers take scalars only: lists become strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in to_dict(cfg).items()}


def check_launch(accelerator) -> None:
    """Refuse launches that would train wrongly, before any model loads: several processes started (WORLD_SIZE >
    1) that did not join one process group. accelerate does so on a machine without GPUs unless told to use the
    CPU, and every process would then train alone and write the same output_dir. (DeepSpeed and FSDP are run:
    zeroconv.train.engines; the flags they cannot take are refused there.)"""
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise UserError(f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate joined none of "
                        "them into a process group (no GPU here?), so each would train alone into the same "
                        "output_dir; on CPUs set ACCELERATE_USE_CPU=1 for the launch (gloo), or launch one process")


def validation_metric(cfg: TrainConfig) -> Callable | None:
    """The controllability metric of every validation: --validation_metric, else the --condition's own, else (a
    union run) the first condition column named after a metric (validate.py scores each type by its own)."""
    from zeroconv.evaluate.metrics import METRICS, get_metric

    name = cfg.validation_metric or cfg.condition or next((c for c in union_columns(cfg) if c in METRICS), None)
    return get_metric(name) if name in METRICS else None


def check_union_controlnet(cfg: TrainConfig, controlnet) -> None:
    """A --controlnet_model_name_or_path fits the run: union for a union run (with a control type for every
    condition column: mode k is column k), plain for a plain one."""
    from zeroconv.models.union import union_types

    columns, types = union_columns(cfg), union_types(controlnet)
    where = f"--controlnet_model_name_or_path {cfg.controlnet_model_name_or_path}"
    if columns and not types:
        raise UserError(f"{where}: a plain ControlNet, and --conditioning_image_columns trains a union one; start "
                        "from a union ControlNet, or drop --controlnet_model_name_or_path")
    if not columns and types:
        raise UserError(f"{where}: a union ControlNet of {types} condition types; name its condition columns with "
                        "--conditioning_image_columns (control mode k is column k)")
    if columns and types < len(columns):
        raise UserError(f"{where}: {types} control types, fewer than the {len(columns)} columns of "
                        "--conditioning_image_columns")


def build_parts(cfg: TrainConfig, checked: Checked, evaluator: Callable | None = None) -> dict:
    """The fields of zeroconv.train.run.TrainingRun, from a config preflight has passed."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from zeroconv.data.dataset import collate
    from zeroconv.data.order import batches_per_epoch, epoch_batches
    from zeroconv.train.checkpoint import (TrainerState, check_engine, check_identity, find_resume_checkpoint,
                                           load_checkpoint, load_sharded_checkpoint)
    from zeroconv.train.engines import check_engine_flags, configure_engine, engine_name
    from zeroconv.train.inputs import CachedEncoders, LiveEncoders
    from zeroconv.train.loop import steps_for

    accelerator = make_accelerator(cfg)
    check_launch(accelerator)
    keep_freed_host_memory(cfg.keep_freed_host_memory, accelerator.device.type)
    check_engine_flags(cfg, accelerator)
    seed = run_seed(cfg)
    set_seed(seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # data first: a bad dataset should not cost a model load
    streamed = isinstance(checked.examples, ShardExamples)
    dataset = (build_stream(cfg, checked.examples, seed, accelerator) if streamed
               else build_dataset(cfg, checked.examples, seed))
    base = load_frozen_base(cfg)
    family = base.family
    if cfg.controlnet_model_name_or_path:
        controlnet = family.load_controlnet(cfg.controlnet_model_name_or_path, cache_dir=cfg.cache_dir)
        check_union_controlnet(cfg, controlnet)
    elif union_columns(cfg):
        controlnet = family.build_union_controlnet(
            base, len(union_columns(cfg)), cfg.conditioning_channels, cfg.condition_encoder_init,
            several_per_sample=cfg.union_extra_condition_probability > 0, num_double_layers=cfg.num_double_layers,
            num_single_layers=cfg.num_single_layers)
    else:
        controlnet = family.build_controlnet(base, cfg.conditioning_channels, cfg.condition_encoder_init,
                                             num_layers=cfg.num_layers,
                                             num_extra_conditioning_channels=cfg.num_extra_conditioning_channels,
                                             num_double_layers=cfg.num_double_layers,
                                             num_single_layers=cfg.num_single_layers)
    controlnet.train()
    enable_memory_efficient_attention(cfg, base.unet, controlnet)
    enable_npu_flash_attention(cfg, base.unet, controlnet)
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    if cfg.compile:
        compile_controlnet(controlnet)

    dtype = weight_dtype(accelerator.mixed_precision)
    unet = base.unet
    decoder_params = []
    if not cfg.sd_locked:
        decoder_params = [p for name, p in unet.named_parameters() if name.startswith(family.decoder_prefixes)]
        for p in decoder_params:
            p.requires_grad_(True)
        unet.train()
    # frozen weights in the training dtype; trained ones keep fp32 master weights
    frozen_dtype = {unet: torch.float32 if decoder_params else dtype, **frozen_dtypes(base, dtype)}
    for module, module_dtype in frozen_dtype.items():
        module.to(accelerator.device)
        if module_dtype != torch.float32:
            module.to(dtype=module_dtype)
    controlnet.to(accelerator.device)
    for module in channels_last_modules(cfg.channels_last, cfg.resolution, base, controlnet, unet,
                                        engine_name(accelerator)):
        module.to(memory_format=torch.channels_last)

    lr_scale = (cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
                if cfg.scale_lr else 1.0)
    controlnet_params = [p for p in controlnet.parameters() if p.requires_grad]
    # weights + two AdamW moments, fp32, per kept checkpoint (one more while the next is written)
    checkpoint_bytes = 12 * sum(p.numel() for p in controlnet_params + decoder_params)
    check_disk_space(cfg.output_dir, checkpoint_bytes * ((cfg.checkpoints_total_limit or 1) + 1))
    optimizer = make_optimizer(cfg, controlnet_params, decoder_params, lr_scale)
    per_epoch = (dataset.batches_per_epoch() if streamed else
                 batches_per_epoch(len(dataset), cfg.train_batch_size, accelerator.num_processes, dataset.bucket_of))
    max_train_steps = steps_for(per_epoch, cfg.gradient_accumulation_steps, cfg.num_train_epochs,
                                cfg.max_train_steps)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_train_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    configure_engine(cfg, accelerator, controlnet)
    if decoder_params:
        controlnet, unet, optimizer = accelerator.prepare(controlnet, unet, optimizer)
    else:
        controlnet, optimizer = accelerator.prepare(controlnet, optimizer)
    # FSDP replaces the parameters by sharded ones (the optimizer is given them): clip what the optimizer steps
    trainable_params = [p for group in optimizer.param_groups for p in group["params"]]

    consistency = None
    if cfg.consistency_loss_weight > 0:
        from zeroconv.train.consistency import ConsistencyReward, check_consistency

        # a depth or segmentation model: frozen, beside the frozen base on the device and in its dtype
        consistency = ConsistencyReward(check_consistency(cfg)(accelerator.device, dtype),
                                        cfg.consistency_loss_weight, cfg.consistency_max_timestep)
    ema = None
    if cfg.use_ema:  # from the starting weights; a resume overwrites it with the checkpoint's average
        from zeroconv.train.ema import ControlNetEMA

        ema = ControlNetEMA(accelerator.unwrap_model(controlnet), cfg.ema_decay)
    identity = run_identity(cfg, base, accelerator.unwrap_model(controlnet))
    if streamed:  # --streaming: which dataset (its files and counts are the stream layout's)
        identity.update(checked.examples.index.identity())
    state = TrainerState()
    checkpoint = find_resume_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    if cfg.resume_from_checkpoint == "latest" and checkpoint is None:
        logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting fresh", cfg.output_dir)
    if checkpoint is not None:
        check_identity(checkpoint, identity)
        check_engine(checkpoint, accelerator, engine_name(accelerator))
        if engine_name(accelerator):
            state = load_sharded_checkpoint(checkpoint, accelerator=accelerator, lr_scheduler=lr_scheduler, ema=ema)
        else:
            state = load_checkpoint(checkpoint, controlnet=accelerator.unwrap_model(controlnet),
                                    unet=accelerator.unwrap_model(unet), optimizer=optimizer,
                                    lr_scheduler=lr_scheduler, scaler=accelerator.scaler, ema=ema)
        logger.warning("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.global_step, state.epoch,
                       state.batches_in_epoch)
    if streamed:
        check_stream_resume(state, dataset, checkpoint)

    bucket_of = None if streamed else dataset.bucket_of  # a latent cache never serves a bucketed run (usable_cache)
    cache = usable_cache(cfg, dataset, base, accelerator.device, dtype)
    if cache is None:
        encoders = LiveEncoders(base, accelerator.device, dtype)
    else:  # the cache's latents and embeddings replace the images and captions; the encoders leave the device
        from zeroconv.data.cache import serve

        # the VAE and text encoder end up on the CPU, off the training device, until validation borrows them
        encoders = CachedEncoders(cache.empty_prompts, base, accelerator.device, dtype)
        # a streamed run keeps its stream's order and position; its items come from the cache by global index
        dataset, collate = serve(cache, dataset)
    batches = epoch_batches(dataset, state, batch_size=cfg.train_batch_size, seed=seed,
                            num_workers=cfg.dataloader_num_workers, collate_fn=collate,
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            pin_memory=accelerator.device.type == "cuda", bucket_of=bucket_of)
    metric_fn = validation_metric(cfg)
    if accelerator.is_main_process:
        save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))
    progress = tqdm(total=max_train_steps, initial=state.global_step, desc="train",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    logger.info("%d examples, %d optimizer steps, effective batch %d", len(checked.examples), max_train_steps,
                cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes)
    return dict(cfg=cfg, accelerator=accelerator, base=base, controlnet=controlnet, unet=unet, encoders=encoders,
                noise_scheduler=base.noise_scheduler, noise_recipe=noise_recipe(cfg, max_train_steps), optimizer=optimizer, lr_scheduler=lr_scheduler,
                trainable_params=trainable_params, ema=ema, consistency=consistency, seed=seed, state=state,
                batches=batches, max_train_steps=max_train_steps, weight_dtype=dtype, identity=identity,
                validation_pairs=checked.validation_pairs, dataset=dataset, metric_fn=metric_fn, evaluator=evaluator,
                progress=progress)
