"""Checkpoints that count only when complete, and exact resume.

A checkpoint is written into a hidden temporary folder, every file flushed to disk, a COMPLETE marker written
last, then the folder is renamed into place (a rename is atomic on one filesystem). A process killed mid-save
leaves only a `.tmp` folder that nothing ever loads. `latest` considers complete checkpoints only, and pruning to
`--checkpoints_total_limit` runs after the new checkpoint is in place: there is always at least one good one.

What is saved is everything the next step depends on: ControlNet (its --use_ema average too, and the trained UNet
decoder), optimizer, LR
schedule, grad scaler, every RNG, the data position (epoch, batches consumed in it) and the counters. The run's
identity (base, resolution, architecture) is saved too, and resume refuses a checkpoint whose identity differs.
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

from zeroconv.errors import UserError

logger = logging.getLogger("zeroconv.train")

COMPLETE = "COMPLETE"
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


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
    if ema is not None:
        ema.save(tmp)
    if decoder_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in decoder_state.items()}, tmp / "unet_decoder.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    (tmp / "identity.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    import yaml

    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _fault_injection_pause()
    (tmp / COMPLETE).write_text(f"step {step} saved {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
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
