"""An exponential moving average of the ControlNet's weights (`--use_ema`), on diffusers' EMAModel.

Which weights are which, when it is on:
- the optimizer trains the live weights; they are what the next step starts from, saved in checkpoint-N/controlnet
  and, at the end, in output_dir/without_ema;
- the average is what validation samples and what output_dir holds at the end (the model `zeroconv sample`,
  diffusers and the Hub load), saved in checkpoint-N/controlnet_ema.
EMAModel warms its decay up as min(--ema_decay, (1 + n) / (10 + n)) after n updates, so the average follows the
weights closely early on (decay 0.92 at update 100, 0.99 at 800) instead of lagging behind the initial ones.
A skipped (non-finite) step does not update the average. Resume restores the average and its update count exactly.
The average is kept in float32 whatever the dtype of the weights it follows.

Under the sharding engines (zeroconv.train.engines):
- FSDP2: each process holds a shard of every parameter (a DTensor) and averages that shard only, into a DTensor
  of the same layout. An EMA is elementwise, so the shards' averages are exactly the shards of the average: no
  communication per step, and 1/N of the average's memory per process. The whole average is gathered (every
  process takes part) only where it is read: validation, checkpoint-N/controlnet_ema and the final model. A
  checkpoint holds each process's shard as well (torch.distributed.checkpoint, `save_shards`), which resume loads;
- DeepSpeed ZeRO-2 shards the optimizer state and gradients, not the weights: every process holds them whole and
  identical after each step, and averages them as under DDP (the engine's 16-bit weights where mixed precision
  casts them, averaged in float32). ZeRO-3 partitions the weights and is refused (zeroconv.train.engines).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from zeroconv.hub import EMA_FOLDER


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor: under FSDP2 a parameter holds one shard of the whole on each process."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor`: a DTensor's local shard (its own storage, not a copy), else `tensor`."""
    return tensor.to_local() if is_shard(tensor) else tensor


class ControlNetEMA:
    def __init__(self, controlnet: torch.nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        self.controlnet = controlnet  # unwrapped: the same parameters the optimizer updates (under FSDP2, shards)
        self.names, self.params = map(list, zip(*controlnet.named_parameters()))
        self.average = EMAModel(self.params, decay=decay)  # shadows: clones, DTensors of the same layout under FSDP2
        # float32 where the engine casts the live weights to 16 bits (DeepSpeed's bf16/fp16): an average of 16-bit
        # numbers kept in 16 bits would stop moving once (1 - decay) x the change is below their rounding step
        self.average.to(dtype=torch.float32)
        self.sharded = any(is_shard(p) for p in self.params)

    def update(self) -> None:
        """One EMAModel.step, the same arithmetic in the same order, on this process's part of each tensor.
        EMAModel.step itself would average DTensors exactly too, but through DTensor's dispatch, an overhead on
        every operation of every tensor at every step; and it tells frozen tensors (copied, not averaged) by
        requires_grad, which a DTensor's local shard taken under no_grad does not carry."""
        average = self.average
        average.optimization_step += 1
        decay = average.cur_decay_value = average.get_decay(average.optimization_step)
        one_minus_decay = 1 - decay
        with torch.no_grad():
            for shadow, param in zip(average.shadow_params, self.params):
                shadow_part, param_part = local(shadow), local(param)
                if param.requires_grad:
                    shadow_part.sub_(one_minus_decay * (shadow_part - param_part))
                else:
                    shadow_part.copy_(param_part)

    @contextlib.contextmanager
    def applied(self, full: torch.nn.Module | None):
        """The average in `full` for the duration (validation, saving), then `full`'s own weights back, bit for
        bit; yields `full`. `full` is the main process's whole ControlNet (TrainingRun.full_controlnet: the live
        module, or under DeepSpeed/FSDP a gathered copy), None on the other processes. Every process must enter
        it: under FSDP each parameter's average is gathered from every process's shard."""
        target = dict(full.named_parameters()) if full is not None else None
        stored = []
        with torch.no_grad():
            for name, shadow in zip(self.names, self.average.shadow_params):
                whole = shadow.full_tensor() if is_shard(shadow) else shadow  # a gather under FSDP, one at a time
                if target is not None:
                    param = target[name]
                    stored.append(param.detach().cpu().clone())  # host memory: the device keeps room for sampling
                    param.copy_(whole)
        try:
            yield full
        finally:
            if target is not None:
                with torch.no_grad():
                    for name, kept in zip(self.names, stored):
                        target[name].copy_(kept)

    def save(self, checkpoint: Path, full: torch.nn.Module | None) -> None:
        """checkpoint/controlnet_ema: the whole average in diffusers layout (float32) and its update count, written
        from `full` on the main process (`applied`'s arguments; every process calls it under DeepSpeed/FSDP)."""
        with self.applied(full) as averaged:
            if averaged is not None:
                averaged.save_pretrained(checkpoint / EMA_FOLDER, safe_serialization=True)
        if full is not None:
            (checkpoint / EMA_FOLDER / "ema_state.json").write_text(json.dumps(
                {"optimization_step": self.average.optimization_step, "decay": self.average.decay}))

    def save_shards(self, folder: Path) -> None:
        """Under FSDP2, each process's shard of the average into `folder` (torch.distributed.checkpoint: a file
        per process and one index, which a launch of another process count reshards on load); every process calls
        it. Nothing otherwise: controlnet_ema/ holds the whole average, which is then what every process keeps."""
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._shard_state(), checkpoint_id=str(folder))

    def load(self, checkpoint: Path, shards: Path | None = None) -> None:
        """Restore what `save` (and under FSDP `save_shards`, into `shards`) wrote; every process calls it."""
        from safetensors.torch import load_file

        from zeroconv.errors import UserError

        folder = checkpoint / EMA_FOLDER
        if not (folder / "ema_state.json").is_file():
            raise UserError(f"--resume_from_checkpoint {checkpoint}: has no {EMA_FOLDER}/ (saved without --use_ema); "
                            "resume without --use_ema, or start a new output_dir")
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            if shards is None or not shards.is_dir():
                raise UserError(f"--resume_from_checkpoint {checkpoint}: has no shards of the --use_ema average "
                                f"({shards}); resume it with the launch that wrote it, or start a new output_dir")
            dcp.load(self._shard_state(), checkpoint_id=str(shards))  # in place, into each process's shards
        else:
            weights = load_file(folder / "diffusion_pytorch_model.safetensors")
            with torch.no_grad():
                for name, shadow in zip(self.names, self.average.shadow_params):
                    shadow.copy_(weights[name])
        self.average.optimization_step = json.loads((folder / "ema_state.json").read_text())["optimization_step"]

    def _shard_state(self) -> dict:
        return dict(zip(self.names, self.average.shadow_params))
