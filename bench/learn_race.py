"""How fast control is learned: diffusers' train_controlnet.py against `zeroconv train`, same start, same flags.

    python bench/learn_race.py --peer PATH/train_controlnet.py [--seeds 0 1 2] [--variant NAME="FLAGS"]...

For every seed, both programs train from one ControlNet written by `zeroconv init --base toy --seed S` (the
paper's init; the peer cannot build one for the toy base, whose VAE is 4x), on one Fill set (4,000 examples,
64 px, imagefolder layout, which both read), with the same flags: batch 16, lr 1e-3 constant, 800 steps, a
checkpoint every 100. Each program keeps its own defaults for everything else: that is what a user who
switches gets. Afterwards every checkpoint at --score_steps is sampled on the same held-out outlines with one
sampler (StableDiffusionControlNetPipeline, UniPC, 20 steps, guidance 3, fixed seed) and scored by fill IoU
(zeroconv.evaluate.fill). The table gives the mean, the spread (min-max) and each seed's figure.

--variant NAME="FLAGS" adds a zeroconv run with extra flags (e.g. prompts="--proportion_empty_prompts 0.5").
Runs already finished in --work are reused, so an interrupted race continues where it stopped. The peer runs
as published (bench/peer_env only supplies the torchvision pieces it imports); nothing of it is in this repo.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLER = dict(scheduler="unipc", inference_steps=20, guidance_scale=3.0, seed=0)


def write_data(work: Path, train_examples: int, held_out: int, resolution: int) -> tuple[Path, Path]:
    from zeroconv.data.synth import write_fill

    data, held = work / "data", work / "held_out"
    if not (data / "metadata.jsonl").is_file():
        write_fill(data, train_examples, resolution, 0, "distinct", overwrite=True, progress=False)
        rows = [json.loads(line) for line in (data / "prompt.json").read_text().splitlines() if line.strip()]
        # the imagefolder layout, read alike by `datasets` (the peer) and zeroconv
        (data / "metadata.jsonl").write_text("".join(json.dumps({
            "file_name": r["target"], "conditioning_image_file_name": r["source"], "text": r["prompt"]}) + "\n"
            for r in rows))
        (data / "prompt.json").unlink()
    if not (held / "prompt.json").is_file():  # another seed: no held-out outline is a training example
        write_fill(held, held_out, resolution, 1_000_003, "distinct", workers=1, overwrite=True, progress=False)
    return data, held


def write_init(work: Path, seed: int) -> Path:
    init = work / f"init-{seed}"
    if not (init / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "zeroconv", "init", "--base", "toy", "--out", str(init), "--seed",
                        str(seed)], check=True, capture_output=True)
    return init


def train_command(program: str, peer: str, flags: list[str]) -> list[str]:
    if program == "peer":
        return [sys.executable, str(HERE / "peer_env" / "launch.py"), peer, *flags]
    return [sys.executable, "-m", "zeroconv", "train", *flags]


def run_training(name: str, command: list[str], out: Path, last_step: int) -> float | None:
    """Train unless out/checkpoint-<last_step> exists; returns the wall time in seconds (None when reused)."""
    if (out / f"checkpoint-{last_step}" / "controlnet" / "config.json").is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {out.parent / (out.name + '.log')}")
    seconds = time.perf_counter() - start
    (out / "race_wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def score(out: Path, steps: list[int], held: Path, base) -> dict[int, float]:
    """Held-out mean fill IoU of each checkpoint, one sampler for every program."""
    import numpy as np
    import torch

    from zeroconv.demo import HeldOut
    from zeroconv.evaluate.fill import fill_metrics
    from zeroconv.models.pipeline import build_pipeline, load_controlnet

    cached = out / "race_scores.json"
    scores = {int(k): v for k, v in json.loads(cached.read_text()).items()} if cached.is_file() else {}
    held_out = HeldOut.read(held)
    conditions = held_out.conditions()
    for step in steps:
        if step in scores:
            continue
        pipe = build_pipeline(base, load_controlnet(str(out / f"checkpoint-{step}")), scheduler=SAMPLER["scheduler"])
        with torch.no_grad():
            images = pipe(held_out.prompts, image=conditions, num_inference_steps=SAMPLER["inference_steps"],
                          guidance_scale=SAMPLER["guidance_scale"], height=conditions[0].height,
                          width=conditions[0].width,
                          generator=torch.Generator().manual_seed(SAMPLER["seed"])).images
        ious = [fill_metrics(np.asarray(c), p, np.asarray(im.convert("RGB")))["fill_iou"]
                for c, p, im in zip(conditions, held_out.prompts, images)]
        scores[step] = float(np.mean(ious))
        cached.write_text(json.dumps(scores))
    return scores


def summarize(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", required=True, help="diffusers' examples/controlnet/train_controlnet.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
    parser.add_argument("--score_steps", type=int, nargs="+", default=[100, 200, 400, 800],
                        help="checkpoints scored; the last is the run's length (default: 100 200 400 800)")
    parser.add_argument("--train_examples", type=int, default=4000, help="(default: 4000)")
    parser.add_argument("--held_out", type=int, default=16, help="held-out outlines scored (default: 16)")
    parser.add_argument("--flags", default="--resolution 64 --train_batch_size 16 --learning_rate 1e-3 "
                        "--lr_scheduler constant", help="flags given to both programs (default: %(default)s)")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="an extra zeroconv run with these flags added (repeatable)")
    parser.add_argument("--skip_peer", action="store_true", help="race only zeroconv's runs (a variant study)")
    parser.add_argument("--work", default="learn-race", help="working folder, reused (default: learn-race)")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args()
    if not args.skip_peer and not Path(args.peer).is_file():
        parser.error(f"--peer {args.peer}: no such file; fetch examples/controlnet/train_controlnet.py from a "
                     "diffusers checkout")
    from zeroconv import toy_base
    from zeroconv.cli import quiet_torchvision_notice
    from zeroconv.models.base import load_base

    quiet_torchvision_notice()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    resolution = int(shlex.split(args.flags)[shlex.split(args.flags).index("--resolution") + 1])
    data, held = write_data(work, args.train_examples, args.held_out, resolution)
    programs = ([] if args.skip_peer else [("peer", "peer", [])]) + [("zeroconv", "zeroconv", [])]
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        programs.append((f"zeroconv {name}", "zeroconv", shlex.split(flags)))
    last = max(args.score_steps)
    base = load_base("toy")
    results: dict[str, dict[int, dict[int, float]]] = {}
    walls: dict[str, list[float]] = {}
    for k, seed in enumerate(args.seeds):
        init = write_init(work, seed)
        common = ["--pretrained_model_name_or_path", toy_base(), "--controlnet_model_name_or_path", str(init),
                  "--train_data_dir", str(data), *shlex.split(args.flags), "--max_train_steps", str(last),
                  "--checkpointing_steps", str(min(args.score_steps)), "--seed", str(seed)]
        order = programs if k % 2 == 0 else programs[::-1]  # alternate who goes first: the machine drifts
        for label, program, extra in order:
            out = work / f"{label.replace(' ', '-')}-seed{seed}"
            print(f"seed {seed}: {label} ...", file=sys.stderr, flush=True)
            seconds = run_training(label, train_command(program, args.peer, [*common, *extra, "--output_dir",
                                                                             str(out)]), out, last)
            if seconds is None and (out / "race_wall_seconds.txt").is_file():
                seconds = float((out / "race_wall_seconds.txt").read_text())
            walls.setdefault(label, []).append(seconds or float("nan"))
            results.setdefault(label, {})[seed] = score(out, args.score_steps, held, base)

    print(f"\nheld-out fill IoU ({args.held_out} outlines), mean (min-max) over seeds {args.seeds}; "
          f"toy base, {args.train_examples} Fill examples, flags: {args.flags}")
    header = f"{'program':<28}" + "".join(f"{'step ' + str(s):>20}" for s in args.score_steps) + f"{'train wall s':>14}"
    print(header)
    for label, by_seed in results.items():
        cells = "".join(f"{summarize([by_seed[s][step] for s in args.seeds]):>20}" for step in args.score_steps)
        print(f"{label:<28}{cells}{statistics.fmean(walls[label]):>14.0f}")
    print("\nper seed:")
    for label, by_seed in results.items():
        for seed in args.seeds:
            print(f"  {label:<26} seed {seed}: " + "  ".join(f"{by_seed[seed][s]:.3f}" for s in args.score_steps))
    if args.json:
        Path(args.json).write_text(json.dumps({"flags": args.flags, "seeds": args.seeds, "sampler": SAMPLER,
                                               "results": results, "train_wall_seconds": walls}, indent=1))


if __name__ == "__main__":
    main()
