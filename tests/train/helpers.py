"""Run zeroconv training in-process on tiny bases, and read what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

from zeroconv.config import TrainConfig


def tiny_config(base, data, out, **overrides) -> TrainConfig:
    values = dict(
        pretrained_model_name_or_path=str(base), train_data_dir=str(data), output_dir=str(out), resolution=64,
        train_batch_size=4, learning_rate=1e-4, lr_warmup_steps=0, seed=7, checkpointing_steps=1000,
        validation_steps=1000, report_to="none", logging_steps=1, max_train_steps=4,
        # the live path: the textbook and step-by-step comparisons read its batches (cached runs set cache=)
        cache="off",
        # one density for the whole run, whatever the default: many tests stand for an interrupted run by a shorter
        # one resumed to more steps, and cubic_then_uniform switches at a fraction of --max_train_steps (tested on
        # its own in tests/models/test_noise.py and tests/train/test_recipe.py)
        timestep_sampling="uniform",
        # fp32 on any machine: --mixed_precision auto takes bf16 on a GPU, and the exact comparisons need fp32
        mixed_precision="no",
    )
    values.update(overrides)
    return TrainConfig(**values)


def fresh_setup(cfg: TrainConfig):
    """zeroconv.train.run.setup after resetting accelerate's process-wide state, as a new process would start."""
    from accelerate.state import AcceleratorState, GradientState

    from zeroconv.train.run import setup

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return setup(cfg)


def train_recording_batches(t) -> list[dict]:
    """Run the loop of a run built by fresh_setup to its end; returns every batch the loop took, in order."""
    from zeroconv.train.loop import train_loop

    taken, source = [], t.batches

    def spy():
        for batch in source:
            taken.append(batch)
            yield batch

    t.batches = spy()
    assert train_loop(t) == 0
    t.accelerator.end_training()
    return taken


def run_training(cfg: TrainConfig, evaluator=None) -> int:
    from accelerate.state import AcceleratorState, GradientState

    from zeroconv.train.run import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train(cfg, evaluator)


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def controlnet_weights(folder):
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "controlnet").is_dir():
        folder = folder / "controlnet"
    return load_file(folder / "diffusion_pytorch_model.safetensors")
