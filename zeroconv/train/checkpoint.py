"""Checkpoints that count only when complete, and exact resume.

A checkpoint is written into a hidden temporary folder, every file flushed to disk, a COMPLETE marker written
last, then the folder is renamed into place (a rename is atomic on one filesystem). A process killed mid-save
leaves only a `.tmp` folder that nothing ever loads. `latest` considers complete checkpoints only, and pruning to
`--checkpoints_total_limit` runs after the new checkpoint is in place: there is always at least one good one.

What is saved is everything the next step depends on: ControlNet (its --use_ema average too, and the trained UNet
decoder), optimizer, LR
schedule, grad scaler, every RNG, the data position (epoch, batches consumed in it) and the counters. The run's
identity (base, resolution, architecture) is saved too, and resume refuses a checkpoint whose identity differs.

Under DeepSpeed or FSDP (zeroconv.train.engines) no process holds the whole optimizer state, so every process takes
part: the main process makes the temporary folder (named the same on every process: `.checkpoint-N.tmp-sharded`),
all wait, each writes its shard through accelerate's `save_state` into `engine/` (DeepSpeed's save_checkpoint,
FSDP's DCP; each process's RNG and the grad scaler with them) and, with --use_ema under FSDP, its shard of the
average into `engine/ema/` (DCP as well), all wait again, the average is gathered into `controlnet_ema/` (every
process taking part, the main process writing), and only then does the main process add the run's files and the
gathered weights (`controlnet/`, readable by diffusers), write COMPLETE, rename and prune; a last wait keeps every
process from going on before the checkpoint is in place. Resume loads `engine/` through `load_state` on every
process, and the average from `engine/ema/` (FSDP) or `controlnet_ema/` (DeepSpeed ZeRO-2, whose processes all
hold the whole average). One process and DDP write the format above, unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from zeroconv.durable import fsync_dir, fsync_tree
from zeroconv.errors import UserError

logger = logging.getLogger("zeroconv.train")

COMPLETE = "COMPLETE"
ENGINE_FOLDER = "engine"  # accelerate's save_state of a sharded run
ENGINE_FILE = "engine.json"  # which engine, on how many processes, wrote it
EMA_SHARDS = "ema"  # in engine/: every process's shard of the --use_ema average, under FSDP (DCP)
SHARED_TMP = "sharded"  # the temporary folder's suffix every process of a sharded save agrees on
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Counters that travel in every checkpoint (trainer_state.json)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of this epoch already consumed (per process)
    nonfinite_steps: int = 0  # total skipped updates
    nonfinite_in_a_row: int = 0
    skipped_samples: int = 0  # unreadable samples replaced by others
    nonfinite_log: list = field(default_factory=list)  # steps whose update was skipped
    # a streamed run's layout (zeroconv.data.stream.StreamDataset.layout), which gives batches_in_epoch its meaning
    stream: dict = field(default_factory=dict)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def rng_state() -> dict:
    """The global generators' states. A training step draws nothing from them (each sample's draws come from
    (seed, step, index): zeroconv.models.draws); saved so whatever else draws continues as it would have."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "generator" in state:  # written by a zeroconv that drew a whole batch from one run generator
        logger.warning("this checkpoint comes from a zeroconv that drew each batch's noise from one generator; from "
                       "here on every sample draws from its own (seed, step, index): the run continues correctly "
                       "but not bit-identically to how that version would have continued it")
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, *, controlnet, decoder_state: dict | None, optimizer,
                    lr_scheduler, scaler, state: TrainerState, identity: dict,
                    config: dict, total_limit: int | None = None, ema=None) -> Path:
    """Write checkpoint-{step} atomically, then prune old ones. Call on the main process only."""
    from safetensors.torch import save_file

    tmp = _fresh_folder(output_dir, step, str(os.getpid()))
    controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
    if ema is not None:
        ema.save(tmp, controlnet)
    if decoder_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in decoder_state.items()}, tmp / "unet_decoder.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    _write_run_files(tmp, lr_scheduler, state, identity, config)
    return _put_in_place(tmp, output_dir, step, total_limit)


def save_sharded_checkpoint(accelerator, output_dir: str | Path, step: int, *, controlnet, lr_scheduler,
                            state: TrainerState, identity: dict, config: dict, total_limit: int | None = None,
                            ema=None) -> Path:
    """Write checkpoint-{step} of a DeepSpeed/FSDP run atomically, then prune old ones. Every process calls it;
    `controlnet` is the gathered plain copy on the main process (zeroconv.train.engines.gathered_copy), None on
    the others; `ema` the --use_ema average (zeroconv.train.ema.ControlNetEMA), on every process."""
    output_dir = Path(output_dir)
    tmp = output_dir / f".checkpoint-{step}.tmp-{SHARED_TMP}"
    if accelerator.is_main_process:
        _fresh_folder(output_dir, step, SHARED_TMP)
    accelerator.wait_for_everyone()  # the folder exists, empty, before any process writes its shard
    accelerator.save_state(str(tmp / ENGINE_FOLDER))
    if ema is not None:
        ema.save_shards(tmp / ENGINE_FOLDER / EMA_SHARDS)
    accelerator.wait_for_everyone()  # every shard is written before the checkpoint can be marked complete
    if ema is not None:
        ema.save(tmp, controlnet)  # the average gathered into the main process's copy, written there
    final = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
        (tmp / ENGINE_FILE).write_text(json.dumps(engine_record(accelerator), indent=1))
        _write_run_files(tmp, lr_scheduler, state, identity, config)
        final = _put_in_place(tmp, output_dir, step, total_limit)
    accelerator.wait_for_everyone()  # nobody trains on (or saves again) before the checkpoint is in place
    return final


def engine_record(accelerator) -> dict:
    return {"distributed_type": accelerator.distributed_type.name, "num_processes": accelerator.num_processes}


def _fresh_folder(output_dir: str | Path, step: int, suffix: str) -> Path:
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp-{suffix}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _write_run_files(tmp: Path, lr_scheduler, state: TrainerState, identity: dict, config: dict) -> None:
    """What is the same on every process: the schedule, the counters and data position, the run's identity."""
    import yaml

    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    (tmp / "identity.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _put_in_place(tmp: Path, output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """COMPLETE last, everything on disk, then the rename: from here on `latest` may pick it, and only then are
    older checkpoints pruned."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    _fault_injection_pause()
    (tmp / COMPLETE).write_text(f"step {step} saved {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(output_dir)
    if total_limit is not None:
        prune_checkpoints(output_dir, total_limit)
    return final


def _fault_injection_pause() -> None:
    """Tests kill the trainer while a checkpoint is half-written; this widens that window on request."""
    delay = float(os.environ.get("ZEROCONV_TEST_SLOW_CHECKPOINT", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def prune_checkpoints(output_dir: Path, total_limit: int) -> None:
    """Delete the oldest complete checkpoints beyond `total_limit`, and leftovers of interrupted saves."""
    checkpoints = complete_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - max(1, total_limit))]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in output_dir.glob(".checkpoint-*.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(leftover, ignore_errors=True)


def find_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """Resolve --resume_from_checkpoint: None, 'latest' (None if there is none yet) or an explicit folder."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.exists() and (Path(output_dir) / resume).exists():
        path = Path(output_dir) / resume
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    if not (path / COMPLETE).is_file():
        raise UserError(f"--resume_from_checkpoint {resume}: checkpoint is incomplete (no {COMPLETE} marker; the save "
                        "was interrupted); pass an earlier checkpoint or 'latest'")
    return path


def check_identity(checkpoint: Path, identity: dict) -> None:
    saved = json.loads((checkpoint / "identity.json").read_text())
    differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {identity.get(k)!r}" for k in differ)
        raise UserError(f"--resume_from_checkpoint {checkpoint}: made by a different run ({details}); resume with "
                        "the same settings or start a new output_dir")


def load_checkpoint(checkpoint: Path, *, controlnet, unet, optimizer, lr_scheduler, scaler,
                    ema=None) -> TrainerState:
    """Restore everything `save_checkpoint` wrote into the live objects; returns the counters."""
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "controlnet" / "diffusion_pytorch_model.safetensors")
    controlnet.load_state_dict(weights, strict=True)
    if ema is not None:
        ema.load(checkpoint)
    if (checkpoint / "unet_decoder.safetensors").is_file():
        unet.load_state_dict(load_file(checkpoint / "unet_decoder.safetensors"), strict=False)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))
    lr_scheduler.load_state_dict(torch.load(checkpoint / "lr_scheduler.pt", weights_only=False))
    if scaler is not None and (checkpoint / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=False))
    restore_rng_state(torch.load(checkpoint / "rng.pt", weights_only=False))
    return TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text()))


def load_sharded_checkpoint(checkpoint: Path, *, accelerator, lr_scheduler, ema=None) -> TrainerState:
    """Restore what `save_sharded_checkpoint` wrote: every process loads its shard of weights and optimizer, its
    RNG and the grad scaler through accelerate's `load_state`, and the --use_ema average (`ema`); returns the
    counters."""
    accelerator.load_state(str(checkpoint / ENGINE_FOLDER))
    if ema is not None:
        ema.load(checkpoint, checkpoint / ENGINE_FOLDER / EMA_SHARDS)
    lr_scheduler.load_state_dict(torch.load(checkpoint / "lr_scheduler.pt", weights_only=False))
    return TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text()))


def check_engine(checkpoint: Path, accelerator, engine: str | None) -> None:
    """A checkpoint resumes under the kind of launch that wrote it: a sharded one holds its optimizer state only as
    its engine's shards, and a plain one holds it whole, which the engines' load_state does not read."""
    sharded = (checkpoint / ENGINE_FOLDER).is_dir()
    where = f"--resume_from_checkpoint {checkpoint}"
    if not sharded and engine is not None:
        raise UserError(f"{where}: written by one process or DDP, and this launch uses {engine}; resume it with the "
                        "launch that wrote it (e.g. configs/accelerate/ddp.yaml), or start a new output_dir")
    if not sharded:
        return
    saved, now = json.loads((checkpoint / ENGINE_FILE).read_text()), engine_record(accelerator)
    if engine is None or saved["distributed_type"] != now["distributed_type"]:
        raise UserError(f"{where}: written under {saved['distributed_type']}, and this launch uses "
                        f"{now['distributed_type']}; resume with the accelerate config that wrote it, or start a new "
                        "output_dir")
    if saved["distributed_type"] == "DEEPSPEED" and saved["num_processes"] != now["num_processes"]:
        raise UserError(f"{where}: DeepSpeed's shards of {saved['num_processes']} processes, and this launch has "
                        f"{now['num_processes']}; resume with --num_processes {saved['num_processes']}")
