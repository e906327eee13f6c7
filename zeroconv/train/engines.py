"""What changes when DeepSpeed or FSDP shards the ControlNet across processes (the accelerate config decides).

Under those engines no process holds the whole training state, so:
- checkpoints go through accelerate's save_state/load_state, which every process calls (zeroconv.train.checkpoint
  `save_sharded_checkpoint`);
- whatever needs the full weights (validation, the checkpoint's readable copy, the final model) gets a plain copy
  built on the main process from `accelerator.get_state_dict`, a gather every process takes part in;
- --use_ema: under FSDP each process averages its own shard of the weights (exact: an EMA is elementwise), saves
  that shard in the checkpoint, and the whole average is gathered where it is read; under DeepSpeed ZeRO-2 every
  process holds the weights whole and averages them as under DDP (zeroconv.train.ema);
- what zeroconv cannot do correctly there yet is refused at the start, naming the flag: --use_ema under DeepSpeed
  ZeRO-3 (it partitions the weights themselves, which the average does not read; untested without GPUs),
  --sd_locked false (a second trained module: DeepSpeed takes one, and the UNet's decoder would need sharding of
  its own) and, under DeepSpeed, --gradient_accumulation_steps > 1 (DeepSpeed steps and scales inside the
  backward, where zeroconv accumulates by itself).
One process and DDP keep every process whole and none of this applies.
"""

from __future__ import annotations

import torch

from zeroconv.errors import UserError

ENGINE_NAMES = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}


def engine_name(accelerator) -> str | None:
    """'DeepSpeed' or 'FSDP' when that engine shards this run, else None."""
    return ENGINE_NAMES.get(getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type)))


def is_sharded(accelerator) -> bool:
    return engine_name(accelerator) is not None


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run (from its accelerate config), else None."""
    if engine_name(accelerator) != "DeepSpeed":
        return None
    return accelerator.state.deepspeed_plugin.zero_stage


def check_engine_flags(cfg, accelerator) -> None:
    """Refuse, before any model loads, the flags zeroconv does not run correctly under a sharding engine."""
    engine = engine_name(accelerator)
    if engine is None:
        return
    refused = [("--sd_locked false", not cfg.sd_locked, "the UNet decoder would be a second sharded trained module")]
    if zero_stage(accelerator) == 3:
        engine = "DeepSpeed ZeRO-3"
        refused.append(("--use_ema", cfg.use_ema, "ZeRO-3 partitions the weights themselves, which the average does "
                        "not read (it runs under ZeRO-2 and FSDP, configs/accelerate/deepspeed_zero2.yaml and "
                        "fsdp.yaml)"))
    if engine.startswith("DeepSpeed"):
        refused.append((f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}",
                        cfg.gradient_accumulation_steps > 1,
                        "DeepSpeed steps inside the backward; raise --train_batch_size or the GPU count instead"))
    for flag, given, why in refused:
        if given:
            raise UserError(f"{flag}: not supported under {engine} (from your accelerate config): {why}; drop the "
                            "flag, or launch with DDP (configs/accelerate/ddp.yaml)")


# The repeated blocks of the ControlNets zeroconv builds (SD/SDXL, SD3, Flux): FSDP's units. A size-based policy
# would wrap ModuleLists (the zero convs, the down blocks), which FSDP2 refuses ("fully_shard does not support
# containers that do not implement forward"), and diffusers' ControlNets name no _no_split_modules.
FSDP_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "JointTransformerBlock", "FluxTransformerBlock",
               "FluxSingleTransformerBlock")


def configure_engine(cfg, accelerator, controlnet) -> None:
    """Fill in, before accelerate.prepare, what the engine's config leaves to the model and flags. DeepSpeed: the
    per-GPU batch and the clipping norm (no dataloader goes through prepare, where accelerate would read the
    batch). FSDP with TRANSFORMER_BASED_WRAP and no fsdp_transformer_layer_cls_to_wrap: this ControlNet's blocks."""
    engine = engine_name(accelerator)
    if engine == "DeepSpeed":
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    elif engine == "FSDP":
        plugin = accelerator.state.fsdp_plugin
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
            present = {type(module).__name__ for module in controlnet.modules()}
            plugin.transformer_cls_names_to_wrap = [name for name in FSDP_BLOCKS if name in present]


def plain_class(module: torch.nn.Module) -> type:
    """The model's own class: FSDP2's fully_shard swaps in a subclass defined in torch.distributed."""
    return next(c for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed"))


def gathered_copy(accelerator, model) -> torch.nn.Module | None:
    """A plain, unsharded copy of the prepared `model` (a diffusers model) on the main process, float32, on the
    accelerator's device; None on the others. Every process must call it: the weights are gathered."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    module = accelerator.unwrap_model(model)
    with torch.random.fork_rng(devices=[]):  # the copy's random init must not move the main process's generator
        plain = plain_class(module).from_config(module.config)
    plain.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return plain.to(accelerator.device).eval()
