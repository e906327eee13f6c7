"""`zeroconv demo`: lllyasviel's Fill50K sanity check, on the toy base, offline, on a laptop CPU in minutes.

It writes a small Fill set (train + held-out outlines), samples the toy base alone on the held-out prompts (the
baseline: right colors, circle anywhere), trains a ControlNet with `zeroconv train`'s code, and at every
validation samples the held-out outlines and scores them with the fill metric (zeroconv.evaluate.fill). It prints
the metric over steps and the step where control appears (fill IoU first above 0.5: lllyasviel's "sudden
convergence"), and writes into --output_dir:

- grid.png: condition | base alone | ControlNet | target, one held-out example a row;
- curve.png: fill IoU and color accuracies over training steps, the baseline and the 0.5 line;
- samples.jsonl + samples/: every image scored, so `zeroconv eval OUT/samples.jsonl` recomputes the table;
- summary.json, report.md; controlnet/ (the trained ControlNet, metrics.jsonl); data/;
- report.html: the page of `zeroconv report` (a slider over the held-out samples of every validation, the curves),
  rewritten at every validation so it can be watched during the run.
"""

from __future__ import annotations

import os

# On a CPU shared with other processes, torch's spinning OpenMP threads wait on each other: steps 10-16x slower were
# measured on a loaded 2-core machine. Passive waiting avoids that, at a price on an idle machine (up to 2x on the
# tiniest bench model's step, whose parallel regions are microseconds long). The demo's figures were measured with
# it; a user's own OMP_WAIT_POLICY wins. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from zeroconv.config import CONDITION_ENCODER_INITS, option, parse  # noqa: E402
from zeroconv.errors import UserError  # noqa: E402

CONTROL_THRESHOLD = 0.5
SCORES = ("fill_iou", "circle_color_accuracy", "background_color_accuracy")


@dataclass
class DemoConfig:
    output_dir: str = option("demo-out", "Where the data, samples, ControlNet, grid, curve and report go.")
    quick: bool = option(False, "A seconds-long run with tiny numbers (the test suite's); its figures mean nothing.")
    base: str = option("toy", "Base model: 'toy' (shipped with zeroconv) or another 64 px diffusers SD folder.")
    seed: int = option(0, "Seed of the data, the training and the samples.")
    train_examples: int = option(4000, "Fill examples to train on.")
    held_out: int = option(16, "Held-out outlines scored at every validation.")
    resolution: int = option(64, "Image side in pixels (the toy base's).")
    max_train_steps: int = option(800, "ControlNet optimizer steps.")
    train_batch_size: int = option(16, "Batch size.")
    learning_rate: float = option(
        1e-3, "ControlNet learning rate: high, because a tiny ControlNet at SD's 1e-5 would need hours to converge.")
    condition_encoder_init: str | None = option(
        None, "Initial weights of the ControlNet's condition encoder (unset: `zeroconv train`'s default, "
        "unit_variance; see its --help); 'paper' shows how much later control appears with PyTorch's default init.",
        choices=list(CONDITION_ENCODER_INITS))
    cache: str = option("auto", "Cache the training set's latents and text embeddings (`zeroconv train --cache`), "
                        "in OUT/cache; 'off' encodes every batch.", choices=["auto", "off"])
    lr_warmup_steps: int = option(50, "Warm-up steps.")
    proportion_empty_prompts: float = option(
        0.0, "Fraction of prompts dropped in training: `zeroconv train`'s default. The paper's 0.5 learns the outline "
        "more slowly but keeps the circle colors under guidance late in the run (README, the demo).")
    validation_steps: int = option(50, "Validate (sample and score the held-out outlines) every N steps.")
    inference_steps: int = option(20, "Denoising steps of every sample.")
    guidance_scale: float = option(
        3.0, "Classifier-free guidance scale of every sample. The toy base draws its prompted colors best at 3-5; at "
        "7.5 they oversaturate (circle color accuracy 0.94 at 3, 0.81 at 7.5 on 32 held-out prompts).")
    grid_rows: int = option(6, "Held-out examples shown in grid.png.")
    train_flags: str = option(
        "", "More `zeroconv train` flags for the ControlNet's training, as one string, applied over the demo's own "
        "(e.g. '--timestep_sampling cubic --use_ema'): how bench/recipe.py measures each option on the demo. The "
        "base, data and output folders are the demo's.", metavar="FLAGS")

    def shrink_for_quick(self) -> None:
        self.train_examples, self.held_out, self.max_train_steps, self.train_batch_size = 8, 2, 4, 2
        self.validation_steps, self.inference_steps, self.lr_warmup_steps, self.grid_rows = 2, 2, 0, 2


# ---------------------------------------------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class HeldOut:
    folder: Path  # Fill50K layout
    rows: list[dict]  # prompt.json rows

    @classmethod
    def read(cls, folder: Path) -> "HeldOut":
        rows = [json.loads(line) for line in (folder / "prompt.json").read_text().splitlines() if line.strip()]
        return cls(folder, rows)

    @property
    def prompts(self) -> list[str]:
        return [row["prompt"] for row in self.rows]

    def conditions(self):
        from PIL import Image

        return [Image.open(self.folder / row["source"]).convert("RGB") for row in self.rows]


class Recorder:
    """Saves every demo sample under OUT/samples/<model>/, lists it in OUT/samples.jsonl, scores it from disk."""

    def __init__(self, out: Path, held_out: HeldOut):
        self.out, self.held_out = out, held_out
        self.samples_file = out / "samples.jsonl"
        self.samples_file.write_text("")
        self.history: list[dict] = []  # {"model", "step", score: mean, ...} in order

    def record(self, model: str, step: int, images) -> dict[str, float]:
        from zeroconv.evaluate.cli import score_samples

        folder = self.out / "samples" / model
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (image, row) in enumerate(zip(images, self.held_out.rows)):
            image.save(folder / f"{i}.png")
            rows.append({"image": f"samples/{model}/{i}.png", "condition": os.path.relpath(
                self.held_out.folder / row["source"], self.out), "prompt": row["prompt"], "model": model, "step": step,
                "metric": "fill"})
        with open(self.samples_file, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        # scored from the saved PNGs by the code of `zeroconv eval`, so the figures can be recomputed
        on_disk = [{**r, "image": self.out / r["image"], "condition": self.out / r["condition"]} for r in rows]
        means = score_samples(on_disk, group_by=None)["all"]
        self.history.append({"model": model, "step": step, **{k: means[k] for k in SCORES}})
        return {k: means[k] for k in SCORES}


def generate(pipe, held_out: HeldOut, cfg: DemoConfig, with_condition: bool):
    """One image per held-out prompt, all in one batch, from the same seed whatever the model."""
    import torch

    kwargs = dict(num_inference_steps=cfg.inference_steps, guidance_scale=cfg.guidance_scale,
                  generator=torch.Generator().manual_seed(cfg.seed), height=cfg.resolution, width=cfg.resolution)
    if with_condition:
        kwargs["image"] = held_out.conditions()
    with torch.no_grad():
        return pipe(held_out.prompts, **kwargs).images


# ---------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------

def draw_grid(out: Path, held_out: HeldOut, base_images, controlnet_images, final_label: str, rows: int,
              scale: int = 2):
    from PIL import Image, ImageDraw

    rows = min(rows, len(held_out.rows))
    size = held_out.conditions()[0].size[0] * scale
    header, caption = 16, 12
    titles = ["condition", "base alone", final_label, "target"]
    grid = Image.new("RGB", (4 * size, header + rows * (size + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        draw.text((c * size + 3, 2), title, fill="black")
    conditions = held_out.conditions()
    for r in range(rows):
        target = Image.open(held_out.folder / held_out.rows[r]["target"]).convert("RGB")
        y = header + r * (size + caption)
        for c, image in enumerate([conditions[r], base_images[r], controlnet_images[r], target]):
            grid.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (c * size, y))
        draw.text((3, y + size), held_out.rows[r]["prompt"][: 4 * size // 6], fill="black")
    grid.save(out / "grid.png")


def draw_curve(out: Path, history: list[dict], baseline: dict, control_step: int | None, max_step: int):
    """Scores over steps as a PNG, drawn with PIL: no plotting dependency for one chart."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 640, 400, 50, 170, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def xy(step, value):
        return left + plot_w * step / max(1, max_step), top + plot_h * (1 - value)

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, tick)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 34, y - 6), f"{tick:.2f}", fill="black")
    for k in range(5):
        step = round(max_step * k / 4)
        x, _ = xy(step, 0)
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill="black")
        draw.text((x - 10, top + plot_h + 6), str(step), fill="black")
    draw.text((left + plot_w // 2 - 40, height - 16), "training step", fill="black")

    def dashed(y, color):
        for x in range(left, left + plot_w, 8):
            draw.line([x, y, min(x + 4, left + plot_w), y], fill=color)

    dashed(xy(0, CONTROL_THRESHOLD)[1], (200, 0, 0))
    dashed(xy(0, baseline["fill_iou"])[1], (120, 120, 120))
    colors = {"fill_iou": (30, 80, 200), "circle_color_accuracy": (230, 130, 0),
              "background_color_accuracy": (40, 160, 40)}
    points = [{"step": 0, **baseline}] + history
    for key, color in colors.items():
        line = [xy(p["step"], p[key]) for p in points]
        draw.line(line, fill=color, width=3 if key == "fill_iou" else 2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    if control_step is not None:
        x, _ = xy(control_step, 0)
        for y in range(top, top + plot_h, 8):
            draw.line([x, y, x, min(y + 4, top + plot_h)], fill=(200, 0, 0))
    legend = [("fill IoU", colors["fill_iou"]), ("circle color acc.", colors["circle_color_accuracy"]),
              ("background color acc.", colors["background_color_accuracy"]),
              ("base alone IoU", (120, 120, 120)), (f"IoU {CONTROL_THRESHOLD}", (200, 0, 0))]
    for i, (label, color) in enumerate(legend):
        y = top + 10 + 18 * i
        draw.line([left + plot_w + 10, y + 6, left + plot_w + 30, y + 6], fill=color, width=3)
        draw.text((left + plot_w + 35, y), label, fill="black")
    image.save(out / "curve.png")


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def first_step_with_control(history: list[dict]) -> int | None:
    return next((row["step"] for row in history if row["fill_iou"] > CONTROL_THRESHOLD), None)


def format_table(baseline: dict, history: list[dict]) -> str:
    lines = [f"{'model':<18}{'fill IoU':>10}{'circle color':>14}{'background color':>18}"]
    for label, row in [("base alone", baseline)] + [(f"ControlNet @ {h['step']}", h) for h in history]:
        lines.append(f"{label:<18}{row['fill_iou']:>10.3f}{row['circle_color_accuracy']:>14.3f}"
                     f"{row['background_color_accuracy']:>18.3f}")
    return "\n".join(lines)


# TrainConfig fields the demo sets from its own options (their demo flag) or itself (None): not --train_flags'
DEMO_OWNED = {"pretrained_model_name_or_path": "base", "train_data_dir": None, "output_dir": "output_dir",
              "latent_cache_dir": "output_dir", "validation_baseline": None, "resolution": "resolution",
              "train_batch_size": "train_batch_size", "max_train_steps": "max_train_steps",
              "learning_rate": "learning_rate", "lr_warmup_steps": "lr_warmup_steps", "seed": "seed",
              "proportion_empty_prompts": "proportion_empty_prompts", "validation_steps": "validation_steps",
              "validation_inference_steps": "inference_steps", "validation_guidance_scale": "guidance_scale",
              "condition_encoder_init": "condition_encoder_init", "cache": "cache"}


def train_config(cfg: DemoConfig, data: Path, out: Path):
    """The TrainConfig of the demo's ControlNet: the demo's settings, then --train_flags over them."""
    import dataclasses
    import shlex

    from zeroconv.config import TrainConfig, build_parser, check_train_config

    parser = build_parser(TrainConfig, prog="zeroconv demo --train_flags")
    given = vars(parser.parse_args(shlex.split(cfg.train_flags)))  # only the flags given (their default: unset)
    given.pop("config", None)
    for name in sorted(set(given) & set(DEMO_OWNED)):
        own = DEMO_OWNED[name]
        raise UserError(f"--train_flags: --{name} is the demo's to set" +
                        (f"; use the demo's own --{own}" if own else ""))
    demo = TrainConfig(
        pretrained_model_name_or_path=cfg.base, train_data_dir=str(data), output_dir=str(out / "controlnet"),
        resolution=cfg.resolution, train_batch_size=cfg.train_batch_size, max_train_steps=cfg.max_train_steps,
        learning_rate=cfg.learning_rate, lr_warmup_steps=cfg.lr_warmup_steps, lr_scheduler="constant_with_warmup",
        proportion_empty_prompts=cfg.proportion_empty_prompts, seed=cfg.seed,
        checkpointing_steps=cfg.max_train_steps + 1,  # the final model is saved anyway; checkpoints only cost time
        validation_steps=cfg.validation_steps, validation_inference_steps=cfg.inference_steps,
        validation_guidance_scale=cfg.guidance_scale, report_to="none", logging_steps=max(1, cfg.validation_steps // 4),
        condition_encoder_init=cfg.condition_encoder_init, cache=cfg.cache, latent_cache_dir=str(out / "cache"),
        validation_baseline=False)  # the demo samples the base alone itself (its own pipeline, no ControlNet)
    training = dataclasses.replace(demo, **given)
    check_train_config(training)
    return training


def write_progress(out: Path, baseline: dict, history: list[dict]) -> None:
    """summary.json so far: the base-alone baseline is on disk nowhere else, and `zeroconv report` needs it to show
    a demo that is still training. The finished demo rewrites the file with everything."""
    (out / "summary.json").write_text(json.dumps({"baseline": baseline, "history": history}, indent=1))


def run_demo(cfg: DemoConfig) -> dict:
    """The whole demo; returns the summary written to OUT/summary.json."""
    from zeroconv.data.synth import write_fill
    from zeroconv.models.base import check_base_arg, load_base
    from zeroconv.report import refresh_report
    from zeroconv.train.run import train

    check_base_arg(cfg.base, flag="--base")  # before minutes of data writing
    if cfg.quick:
        cfg.shrink_for_quick()
    for flag in ("train_examples", "held_out", "max_train_steps", "train_batch_size", "validation_steps",
                 "inference_steps"):
        if getattr(cfg, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    out = Path(cfg.output_dir)
    training = train_config(cfg, out / "data" / "train", out)  # --train_flags checked before minutes of data writing
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = print

    log(f"[1/4] writing {cfg.train_examples} training and {cfg.held_out} held-out Fill examples "
        f"({cfg.resolution} px) to {out / 'data'}")
    write_fill(training.train_data_dir, cfg.train_examples, cfg.resolution, cfg.seed, "distinct", overwrite=True,
               progress=not cfg.quick)
    # a different seed: held-out outlines and prompts are not training examples
    held_out = HeldOut.read(write_fill(out / "data" / "held_out", cfg.held_out, cfg.resolution, cfg.seed + 1_000_003,
                                       "distinct", workers=1, overwrite=True, progress=False))
    recorder = Recorder(out, held_out)

    log(f"[2/4] sampling the base alone ({cfg.base}) on the held-out prompts: the baseline")
    base = load_base(cfg.base)
    base_images = generate(base.family.pipeline(base), held_out, cfg, with_condition=False)
    baseline = recorder.record("base", 0, base_images)
    write_progress(out, baseline, recorder.history[1:])
    log(format_table(baseline, []))
    del base

    log(f"[3/4] training a ControlNet: {cfg.max_train_steps} steps, batch {cfg.train_batch_size}, "
        f"validation every {cfg.validation_steps} steps")
    latest: dict = {}

    def evaluator(step: int, pipe) -> dict[str, float]:
        images = generate(pipe, held_out, cfg, with_condition=True)
        scores = recorder.record(f"controlnet-step-{step:06d}", step, images)
        latest.update(step=step, images=images)
        write_progress(out, baseline, recorder.history[1:])
        refresh_report(out)
        return {f"heldout/{k}": v for k, v in scores.items()}

    train_start = time.perf_counter()
    code = train(training, evaluator=evaluator)
    train_seconds = time.perf_counter() - train_start
    if code != 0:
        raise SystemExit(code)
    history = recorder.history[1:]

    log("[4/4] results")
    control_step = first_step_with_control(history)
    table = format_table(baseline, history)
    draw_grid(out, held_out, base_images, latest["images"], f"ControlNet @ {latest['step']}", cfg.grid_rows)
    draw_curve(out, history, baseline, control_step, cfg.max_train_steps)
    seconds = time.perf_counter() - start
    summary = {
        "baseline": baseline, "history": history, "final": history[-1] if history else None,
        "control_step": control_step, "control_threshold": CONTROL_THRESHOLD, "wall_seconds": round(seconds, 1),
        "train_seconds": round(train_seconds, 1), "config": {k: getattr(cfg, k) for k in DemoConfig.__dataclass_fields__},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    refresh_report(out)
    control = (f"control appears at step {control_step} (held-out fill IoU first above {CONTROL_THRESHOLD})"
               if control_step is not None else
               f"no control yet: held-out fill IoU never rose above {CONTROL_THRESHOLD} in {cfg.max_train_steps} steps")
    report = f"""# zeroconv demo: Fill50K on the toy base

{control}; wall time {seconds / 60:.1f} min (training and validation {train_seconds / 60:.1f} min).

```
{table}
```

![condition | base alone | ControlNet | target](grid.png)

![scores over training steps](curve.png)

Recompute every figure from the saved images: `zeroconv eval {out / 'samples.jsonl'}`
"""
    (out / "report.md").write_text(report)
    log(table)
    log(control)
    log(f"wall time {seconds / 60:.1f} min; grid {out / 'grid.png'}, curve {out / 'curve.png'}, "
        f"report {out / 'report.md'}, page {out / 'report.html'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse(DemoConfig, argv, prog="zeroconv demo", description=__doc__)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_demo(cfg)
    return 0
