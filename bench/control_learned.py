"""Is control learned (issues 13, 15)? Train a ControlNet on a toy base that denoises (a random one gives it
nothing to steer) on Fill examples (a circle's outline is the condition, the prompt names its colors), then compare
the held-out diffusion loss with the true conditions against the conditions shuffled among the samples
(zeroconv.evaluate.heldout.conditioned_losses). The families:

- sd: the shipped toy base; sdxl: the same denoiser dressed as SDXL (zeroconv.testing.make_toy_sdxl_base);
- sd3, flux: toy SD3 and Flux bases, the toy VAE and CLIP behind a small transformer trained here with flow
  matching (zeroconv.models.toy_flow; built into --work once, about 12-15 minutes each on one CPU thread);
- flux-union: a Flux union ControlNet of two condition types, the outline (control mode 0) and the filled circle
  (mode 1), measured per type: every held-out sample given that type, true against shuffled conditions of it.

Prints one JSON line per family and step count; tests/evaluate/test_control_learned.py runs sd and sdxl with the
suite's step count.

    PYTHONPATH=. python bench/control_learned.py --steps 100 200
    PYTHONPATH=. python bench/control_learned.py --families sd3 flux flux-union --steps 600
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


# Per family: the base's folder under --work (None: the shipped toy base) and the ControlNet's options.
# SD3 and Flux embed the condition's VAE latents from zero (no condition encoder to initialize); their ControlNets
# copy the toy transformers' first blocks, and read T5 at the toy captions' length.
TOY_FLOW_OPTIONS = {"max_sequence_length": 16, "num_layers": 2, "num_double_layers": 2, "num_single_layers": 2}
FAMILIES = {
    "sd": (None, {"condition_encoder_init": "unit_variance"}),
    "sdxl": ("toy_sdxl_base", {"condition_encoder_init": "unit_variance"}),
    "sd3": ("toy_sd3_base", TOY_FLOW_OPTIONS),
    "flux": ("toy_flux_base", TOY_FLOW_OPTIONS),
    # one ControlNet for two condition types: the outline (control mode 0) and the filled circle (mode 1)
    "flux-union": ("toy_flux_base", {**TOY_FLOW_OPTIONS, "conditioning_image_columns": "outline,mask"}),
}


def base_folder(family: str, work: Path) -> tuple[Path, float]:
    """The family's toy base, built into `work` unless it is there already; (folder, seconds it took to build)."""
    from zeroconv.models.toy_base import toy_base_path

    folder, _ = FAMILIES[family]
    if folder is None:
        return toy_base_path(), 0.0
    path = work / folder
    if (path / "model_index.json").is_file():
        return path, 0.0
    started = time.perf_counter()
    if folder == "toy_sdxl_base":
        from zeroconv.testing import make_toy_sdxl_base

        make_toy_sdxl_base(path)
    else:
        from zeroconv.models.toy_flow import make_toy_flow_base

        make_toy_flow_base(path, folder.removeprefix("toy_").removesuffix("_base"))
    return path, time.perf_counter() - started


def write_fill_union(out: Path, n: int, seed: int) -> Path:
    """Fill examples as an imagefolder of two condition columns: "outline" (Fill's condition) and "mask" (the
    filled circle: the outline and what it encloses)."""
    import json

    import cv2
    import numpy as np

    from zeroconv.data.synth import write_fill

    write_fill(out, n, 64, seed, "distinct", workers=1, progress=False)
    (out / "mask").mkdir(exist_ok=True)
    rows = []
    for line in (out / "prompt.json").read_text().splitlines():
        row = json.loads(line)
        outline = (cv2.imread(str(out / row["source"]), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)
        # the outline is closed (Fill draws it 8-connected), so a 4-connected fill from a corner reaches the outside
        outside = outline.copy()
        cv2.floodFill(outside, None, (0, 0), 2)
        mask_path = "mask/" + Path(row["source"]).name
        cv2.imwrite(str(out / mask_path), np.where(outside == 2, 0, 255).astype(np.uint8))
        rows.append({"file_name": row["target"], "text": row["prompt"], "outline_file_name": row["source"],
                     "mask_file_name": mask_path})
    (out / "prompt.json").unlink()  # the imagefolder's metadata.jsonl is the dataset now
    (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def write_data(out: Path, n: int, seed: int, union: bool) -> Path:
    from zeroconv.data.synth import write_fill

    if (out / ("metadata.jsonl" if union else "prompt.json")).is_file():
        return out
    if union:
        return write_fill_union(out, n, seed)
    return write_fill(out, n, 64, seed, "distinct", workers=1, progress=False)


def measure(family: str, root: Path, steps: int, learning_rate: float = 1e-3, train_examples: int = 1000,
            heldout_examples: int = 32, batch_size: int = 16, seed: int = 0, work: Path | None = None) -> dict:
    """Train `family`'s ControlNet in `root` for `steps` and return its figures; the toy base is built into `work`
    (default `root`) unless it is there. A union ControlNet is measured per condition type (its "<column>/true",
    "<column>/shuffled", "<column>/gap"): every held-out sample given that type, with its control mode."""
    from accelerate.state import AcceleratorState, GradientState

    from zeroconv.config import TrainConfig, union_columns
    from zeroconv.data.sources import load_examples
    from zeroconv.evaluate.heldout import conditioned_losses
    from zeroconv.models.base import load_base
    from zeroconv.train.run import train
    from zeroconv.train.setup import build_dataset

    base_dir, base_seconds = base_folder(family, work or root)
    options = FAMILIES[family][1]
    union = "conditioning_image_columns" in options
    train_data = write_data(root / "train", train_examples, seed, union)
    # another seed: held-out outlines are not training examples
    heldout_data = write_data(root / "heldout", heldout_examples, seed + 1_000_003, union)
    cfg = TrainConfig(pretrained_model_name_or_path=str(base_dir), train_data_dir=str(train_data),
                      output_dir=str(root / f"{family}_run_{steps}"), resolution=64, train_batch_size=batch_size,
                      learning_rate=learning_rate, lr_warmup_steps=0, seed=seed, max_train_steps=steps,
                      checkpointing_steps=10_000, validation_steps=10_000, logging_steps=10, report_to="none",
                      cache="auto", latent_cache_dir=str(root / "cache"), **options)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    started = time.perf_counter()
    assert train(cfg) == 0
    seconds = time.perf_counter() - started

    base = load_base(str(base_dir))
    if cfg.max_sequence_length is not None:  # as the run read its prompts
        base.max_sequence_length = cfg.max_sequence_length
    controlnet = base.family.load_controlnet(cfg.output_dir).eval()
    # an untrained ControlNet of the same kind: its output layers are zero, so it adds nothing
    untrained = type(controlnet).from_config(controlnet.config).eval()
    figures = {"family": family, "steps": steps, "train_examples": train_examples, "batch_size": batch_size,
               "learning_rate": learning_rate, "train_seconds": round(seconds, 1),
               "base_build_seconds": round(base_seconds, 1)}
    columns = union_columns(cfg)
    for k, column in enumerate(columns or [None]):
        heldout_cfg = TrainConfig(**{**cfg.__dict__, "train_data_dir": str(heldout_data)})
        if column is not None:  # every held-out sample is given this one type
            heldout_cfg.union_condition_weights = ",".join("1" if j == k else "0" for j in range(len(columns)))
        dataset = build_dataset(heldout_cfg, load_examples(heldout_cfg), seed)
        prefix = "" if column is None else f"{column}/"
        losses = conditioned_losses(base, controlnet, dataset)
        figures.update({prefix + name: round(value, 5) for name, value in losses.items()})
        figures[prefix + "untrained_gap"] = round(conditioned_losses(base, untrained, dataset)["gap"], 5)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--families", nargs="+", default=["sd", "sdxl"], choices=list(FAMILIES))
    parser.add_argument("--train_examples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--work", default="control-learned",
                        help="working folder; the toy bases built there are reused (default: control-learned)")
    args = parser.parse_args()
    work = Path(args.work)
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for steps in args.steps:
                print(json.dumps(measure(family, Path(tmp) / family, steps, args.learning_rate,
                                         train_examples=args.train_examples, batch_size=args.batch_size,
                                         work=work)), flush=True)


if __name__ == "__main__":
    main()
