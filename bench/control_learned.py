"""Is control learned (issue 13)? Train a ControlNet on the tiny SD and the tiny SDXL base on a synthetic task where
the condition decides the image (colored squares; the condition is the square's mask), then compare the held-out
diffusion loss with the true conditions against the conditions shuffled among the samples
(zeroconv.evaluate.heldout.conditioned_losses). Prints one JSON line per base; tests/evaluate/test_control_learned.py
runs the same with the suite's step count.

    PYTHONPATH=. python bench/control_learned.py --steps 150
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def measure(family: str, root: Path, steps: int, learning_rate: float, train_examples: int = 16,
            heldout_examples: int = 16, batch_size: int = 8, seed: int = 0) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from zeroconv.config import TrainConfig
    from zeroconv.data.sources import load_examples
    from zeroconv.evaluate.heldout import conditioned_losses
    from zeroconv.models.base import load_base
    from zeroconv.testing import make_image_dataset, make_tiny_base, make_tiny_sdxl_base
    from zeroconv.train.run import train
    from zeroconv.train.setup import build_dataset

    base_dir = root / f"{family}_base"
    if not (base_dir / "model_index.json").is_file():
        (make_tiny_base(base_dir, prediction_type="epsilon") if family == "sd" else make_tiny_sdxl_base(base_dir))
    train_data = make_image_dataset(root / "train", n=train_examples, size=64, seed=seed)
    heldout_data = make_image_dataset(root / "heldout", n=heldout_examples, size=64, seed=seed + 1)
    cfg = TrainConfig(pretrained_model_name_or_path=str(base_dir), train_data_dir=str(train_data),
                      output_dir=str(root / f"{family}_run"), resolution=64, train_batch_size=batch_size,
                      learning_rate=learning_rate, lr_warmup_steps=0, seed=seed, max_train_steps=steps,
                      checkpointing_steps=10_000, validation_steps=10_000, logging_steps=10, report_to="none",
                      condition_encoder_init="unit_variance", cache="auto", latent_cache_dir=str(root / "cache"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    started = time.perf_counter()
    assert train(cfg) == 0
    seconds = time.perf_counter() - started

    base = load_base(str(base_dir))
    controlnet = base.family.load_controlnet(cfg.output_dir).eval()
    heldout_cfg = TrainConfig(**{**cfg.__dict__, "train_data_dir": str(heldout_data)})
    dataset = build_dataset(heldout_cfg, load_examples(heldout_cfg), seed)
    untrained = base.family.build_controlnet(base, 3, "unit_variance").eval()
    return {"family": family, "steps": steps, "learning_rate": learning_rate, "train_seconds": round(seconds, 1),
            **{k: round(v, 5) for k, v in conditioned_losses(base, controlnet, dataset).items()},
            "untrained_gap": round(conditioned_losses(base, untrained, dataset)["gap"], 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--families", nargs="+", default=["sd", "sdxl"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            print(json.dumps(measure(family, Path(tmp) / family, args.steps, args.learning_rate)), flush=True)


if __name__ == "__main__":
    main()
