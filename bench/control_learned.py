"""Is control learned (issue 13)? Train a ControlNet on the toy base (SD) and on the toy base dressed as SDXL
(zeroconv.testing.make_toy_sdxl_base: the same trained denoiser behind SDXL's two encoders, pooled embedding and
size/crop ids) on Fill examples (a circle's outline is the condition, the prompt names its colors), then compare the
held-out diffusion loss with the true conditions against the conditions shuffled among the samples
(zeroconv.evaluate.heldout.conditioned_losses). Prints one JSON line per family; tests/evaluate/test_control_learned.py
runs the same with the suite's step count.

    PYTHONPATH=. python bench/control_learned.py --steps 100 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def measure(family: str, root: Path, steps: int, learning_rate: float = 1e-3, train_examples: int = 1000,
            heldout_examples: int = 32, batch_size: int = 16, seed: int = 0) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from zeroconv.config import TrainConfig
    from zeroconv.data.sources import load_examples
    from zeroconv.data.synth import write_fill
    from zeroconv.evaluate.heldout import conditioned_losses
    from zeroconv.models.base import load_base
    from zeroconv.models.toy_base import toy_base_path
    from zeroconv.testing import make_toy_sdxl_base
    from zeroconv.train.run import train
    from zeroconv.train.setup import build_dataset

    if family == "sd":
        base_dir = toy_base_path()
    else:
        base_dir = root / "toy_sdxl_base"
        if not (base_dir / "model_index.json").is_file():
            make_toy_sdxl_base(base_dir)
    train_data = root / "train"
    if not (train_data / "prompt.json").is_file():
        write_fill(train_data, train_examples, 64, seed, "distinct", workers=1, progress=False)
    heldout_data = root / "heldout"
    if not (heldout_data / "prompt.json").is_file():  # another seed: held-out outlines are not training examples
        write_fill(heldout_data, heldout_examples, 64, seed + 1_000_003, "distinct", workers=1, progress=False)
    cfg = TrainConfig(pretrained_model_name_or_path=str(base_dir), train_data_dir=str(train_data),
                      output_dir=str(root / f"{family}_run_{steps}"), resolution=64, train_batch_size=batch_size,
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
    return {"family": family, "steps": steps, "train_examples": train_examples, "batch_size": batch_size,
            "learning_rate": learning_rate, "train_seconds": round(seconds, 1),
            **{k: round(v, 5) for k, v in conditioned_losses(base, controlnet, dataset).items()},
            "untrained_gap": round(conditioned_losses(base, untrained, dataset)["gap"], 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--families", nargs="+", default=["sd", "sdxl"])
    parser.add_argument("--train_examples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for steps in args.steps:
                print(json.dumps(measure(family, Path(tmp) / family, steps, args.learning_rate,
                                         train_examples=args.train_examples, batch_size=args.batch_size)),
                      flush=True)


if __name__ == "__main__":
    main()
