"""How fast control is learned: diffusers' train_controlnet.py against `zeroconv train`, same start, same flags.

    python bench/learn_race.py --peer PATH/train_controlnet.py [--seeds 0 1 2] [--variant NAME="FLAGS"]...

For every seed, both programs train from one ControlNet written by `zeroconv init --base toy --seed S` (the
paper's init; the peer cannot build one for the toy base, whose VAE is 4x), on one Fill set (4,000 examples,
64 px, imagefolder layout, which both read), with the same flags: batch 16, lr 1e-3 constant, 800 steps, a
checkpoint every 100. Each program keeps its own defaults for everything else: that is what a user who
switches gets. Afterwards every checkpoint at --score_steps is sampled on the same held-out outlines with one
sampler (StableDiffusionControlNetPipeline, UniPC, 20 steps, guidance 3, fixed seed) and scored by fill IoU
(zeroconv.evaluate.fill); a --use_ema run is scored on its average, as its own validation samples it. The table
gives the mean, the spread (min-max), each seed's figure, and the first scored step at which each seed reaches
--target.

--task canny races on a condition that carries the content instead: the toy base's own captioned shapes
(`zeroconv synth shapes`), their canny edges computed by `zeroconv prepare`, scored by edge F1 (edges re-extracted
from each sample, zeroconv.evaluate.controllability) with the held-out prompt and with an empty prompt: the case
the paper's 50% prompt dropout is meant for.

--variant NAME="FLAGS" adds a zeroconv run with extra flags (e.g. prompts="--proportion_empty_prompts 0.5"); a
variant with --condition_encoder_init X starts from `zeroconv init --condition_encoder_init X` of the same seed
(own="--condition_encoder_init unit_variance": the ControlNet zeroconv builds by default, what a user who switches
gets, against the peer's from_unet start).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Both programs run in this environment. Passive OpenMP waiting: on a shared 2-core machine torch's spinning
# threads made a step 10x slower (the peer's and ours alike); it changes the time, never the numbers.
RUN_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
SAMPLER = dict(scheduler="unipc", inference_steps=20, guidance_scale=3.0, seed=0)


def write_fill_imagefolder(folder: Path, n: int, resolution: int) -> Path:
    """n Fill examples (seed 0) stored at `resolution` in the imagefolder layout, which `datasets` (the peer) and
    zeroconv read alike; kept when already there."""
    from zeroconv.data.synth import write_fill

    if (folder / "metadata.jsonl").is_file():
        return folder
    write_fill(folder, n, resolution, 0, "distinct", overwrite=True, progress=False)
    rows = [json.loads(line) for line in (folder / "prompt.json").read_text().splitlines() if line.strip()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({
        "file_name": r["target"], "conditioning_image_file_name": r["source"], "text": r["prompt"]}) + "\n"
        for r in rows))
    (folder / "prompt.json").unlink()
    return folder


def write_data(work: Path, task: str, train_examples: int, held_out: int, resolution: int) -> tuple[Path, Path]:
    if task == "canny":
        return write_shapes_canny(work, train_examples, held_out, resolution)
    from zeroconv.data.synth import write_fill

    data, held = work / "data", work / "held_out"
    write_fill_imagefolder(data, train_examples, resolution)
    if not (held / "prompt.json").is_file():  # another seed: no held-out outline is a training example
        write_fill(held, held_out, resolution, 1_000_003, "distinct", workers=1, overwrite=True, progress=False)
    return data, held


def write_shapes_canny(work: Path, train_examples: int, held_out: int, resolution: int) -> tuple[Path, Path]:
    """Shapes with their captions, canny edges as the condition, in `zeroconv prepare`'s imagefolder layout."""
    from zeroconv.data.synth import write_shapes

    folders = []
    for name, n, seed in (("data", train_examples, 0), ("held_out", held_out, 1_000_003)):
        out = work / name
        if not (out / "metadata.jsonl").is_file():
            shapes = write_shapes(work / f"{name}-shapes", n, resolution, seed, overwrite=True, progress=False)
            subprocess.run([sys.executable, "-m", "zeroconv", "prepare", "--images", str(shapes), "--condition",
                            "canny", "--resolution", str(resolution), "--caption_file",
                            str(shapes / "metadata.jsonl"), "--preview", "0", "--out", str(out)],
                           check=True, capture_output=True)
        folders.append(out)
    return folders[0], folders[1]


def held_out_set(task: str, held: Path):
    """(prompts, condition images) of the held-out set."""
    from PIL import Image

    if task == "fill":
        from zeroconv.demo import HeldOut

        held_out = HeldOut.read(held)
        return held_out.prompts, held_out.conditions()
    rows = [json.loads(line) for line in (held / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return ([r["text"] for r in rows],
            [Image.open(held / r["conditioning_image_file_name"]).convert("RGB") for r in rows])


# task -> (metric, its score key, score the samples of an empty prompt too)
TASKS = {"fill": ("fill", "fill_iou", False), "canny": ("canny", "edge_f1", True)}


def write_init(work: Path, seed: int, condition_encoder_init: str = "paper") -> Path:
    """The starting ControlNet of seed `seed`: by default the paper's init, as the peer builds its own ControlNet
    (from_unet), so that the race compares training only; a variant that names another --condition_encoder_init
    starts from that one (the same UNet copy, another condition encoder)."""
    init = work / (f"init-{seed}" if condition_encoder_init == "paper" else f"init-{condition_encoder_init}-{seed}")
    if not (init / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "zeroconv", "init", "--base", "toy", "--out", str(init), "--seed",
                        str(seed), "--condition_encoder_init", condition_encoder_init], check=True,
                       capture_output=True)
    return init


def split_init(flags: list[str]) -> tuple[list[str], str]:
    """A variant's flags less its --condition_encoder_init (which `zeroconv train` ignores when it is given a
    ControlNet to start from), and that init: the variant's starting ControlNet is written with it."""
    if "--condition_encoder_init" not in flags:
        return flags, "paper"
    at = flags.index("--condition_encoder_init")
    return flags[:at] + flags[at + 2:], flags[at + 1]


def train_command(program: str, peer: str, flags: list[str]) -> list[str]:
    if program == "peer":
        return [sys.executable, str(HERE / "peer_env" / "launch.py"), peer, *flags]
    return [sys.executable, "-m", "zeroconv", "train", *flags]


def resolved_config(flags: list[str]) -> dict:
    """`zeroconv train`'s resolved config for these flags (every default filled in), less the output folder."""
    from zeroconv.config import TrainConfig, parse, to_dict
    from zeroconv.models.draws import DRAWS
    from zeroconv.models.noise import DDPM_DEFAULT_SAMPLING

    config = to_dict(parse(TrainConfig, flags, prog="zeroconv train"))
    config.pop("output_dir")
    config["pretrained_model_name_or_path"] = base_contents(config["pretrained_model_name_or_path"])
    # unset means the DDPM default (the toy base is one): a run recorded as explicitly that is the same run, and a
    # changed default is a changed value
    config["timestep_sampling"] = config["timestep_sampling"] or DDPM_DEFAULT_SAMPLING
    config["draws"] = DRAWS  # a run recorded without it drew each batch from one generator: another run
    return config


def base_contents(name: str) -> str:
    """A base folder by what it holds, not where: the toy base of another checkout (a worktree) is the same base when
    its files are, and a retrained toy base at the same path is another one."""
    import hashlib

    folder = Path(name)
    if not folder.is_dir():
        return name
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return f"files sha256 {digest.hexdigest()[:16]}"


# Options that change how fast a run goes or what it writes beside the weights, never its numbers (the latent cache
# draws the same latents as live encoding: zeroconv.train.inputs, tests/data/test_cache.py).
SPEED_ONLY = {"cache", "latent_cache_dir", "dataloader_num_workers", "report_to", "logging_steps", "logging_dir",
              "tracker_project_name", "report"}


def same_run(recorded: dict, wanted: dict) -> bool:
    """Equal settings. An option added to zeroconv after the run was made counts as equal when it is at its default
    now: a new option starts out as the behaviour there was before it (a changed default shows as a changed value)."""
    from zeroconv.config import TrainConfig, to_dict

    defaults = {**to_dict(TrainConfig()), "draws": "one generator per batch"}
    recorded = {**recorded, "pretrained_model_name_or_path": base_contents(recorded["pretrained_model_name_or_path"])}
    compared = (recorded.keys() & wanted.keys()) - SPEED_ONLY
    return (all(recorded[key] == wanted[key] for key in compared)
            and all(wanted[key] == defaults[key] for key in wanted.keys() - recorded.keys()))


def zeroconv_run_folder(work: Path, out: Path, flags: list[str], last_step: int) -> Path:
    """Where the zeroconv run of `flags` is: a finished folder of the work dir whose resolved config is the same
    (another label, e.g. a variant whose flag became the default, is the same run), else `out`. Each run records its
    resolved config in race_config.json, so a changed default never reuses a run made under the old one."""
    wanted = resolved_config(flags)
    for recorded in sorted(work.glob("*/race_config.json")):
        if same_run(json.loads(recorded.read_text()), wanted) and \
                (recorded.parent / f"checkpoint-{last_step}" / "controlnet" / "config.json").is_file():
            return recorded.parent
    recorded = json.loads((out / "race_config.json").read_text()) if (out / "race_config.json").is_file() else None
    if (recorded is not None and not same_run(recorded, wanted)) or (recorded is None and any(out.glob("checkpoint-*"))):
        raise SystemExit(f"{out} holds a zeroconv run of other settings (its race_config.json differs, or it has "
                         "none): move it away or use another --work")
    out.mkdir(parents=True, exist_ok=True)
    (out / "race_config.json").write_text(json.dumps(wanted, indent=1, sort_keys=True))
    return out


def run_training(name: str, command: list[str], out: Path, last_step: int, threads: int) -> float | None:
    """Train unless out/checkpoint-<last_step> exists; returns the wall time in seconds (None when reused)."""
    if (out / f"checkpoint-{last_step}" / "controlnet" / "config.json").is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = {**RUN_ENV, "OMP_NUM_THREADS": str(threads)}
    with open(out.parent / f"{out.name}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {out.parent / (out.name + '.log')}")
    seconds = time.perf_counter() - start
    (out / "race_wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def score(out: Path, steps: list[int], task: str, held: Path, base) -> dict[str, dict[int, float]]:
    """Held-out mean score of each checkpoint ({"prompt": ..., and "no prompt": ... where the task has it}),
    one sampler for every program."""
    import numpy as np
    import torch

    from zeroconv.evaluate.metrics import get_metric
    from zeroconv.models.pipeline import build_pipeline, load_controlnet

    metric_name, key, empty_too = TASKS[task]
    metric = get_metric(metric_name)
    cached = out / "race_scores.json"
    scores = json.loads(cached.read_text()) if cached.is_file() else {}
    if scores and all(k.isdigit() for k in scores):  # written by an earlier version: {step: score with prompt}
        scores = {"prompt": scores}
    scores = {mode: {int(k): v for k, v in by_step.items()} for mode, by_step in scores.items()}
    prompts, conditions = held_out_set(task, held)
    modes = {"prompt": prompts, **({"no prompt": [""] * len(prompts)} if empty_too else {})}
    for step in steps:
        if all(step in scores.get(mode, {}) for mode in modes):
            continue
        pipe = build_pipeline(base, load_controlnet(str(out / f"checkpoint-{step}"), base.family),
                              scheduler=SAMPLER["scheduler"])
        for mode, given in modes.items():
            with torch.no_grad():
                images = pipe(given, image=conditions, num_inference_steps=SAMPLER["inference_steps"],
                              guidance_scale=SAMPLER["guidance_scale"], height=conditions[0].height,
                              width=conditions[0].width,
                              generator=torch.Generator().manual_seed(SAMPLER["seed"])).images
            # scored against the held-out prompt even when sampled without it (fill reads its colors there)
            values = [metric(np.asarray(c), p, np.asarray(im.convert("RGB")))[key]
                      for c, p, im in zip(conditions, prompts, images)]
            scores.setdefault(mode, {})[step] = float(np.mean(values))
        cached.write_text(json.dumps(scores))
    return scores


def summarize(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ({min(values):.2f}-{max(values):.2f})"


def first_reaching(by_step: dict[int, float], target: float) -> str:
    """The first scored step with a score >= target, or '>LAST' when none reached it."""
    steps = sorted(by_step)
    return next((str(step) for step in steps if by_step[step] >= target), f">{steps[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", required=True, help="diffusers' examples/controlnet/train_controlnet.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
    parser.add_argument("--score_steps", type=int, nargs="+", default=[100, 200, 400, 800],
                        help="checkpoints scored; the last is the run's length (default: 100 200 400 800)")
    parser.add_argument("--task", choices=sorted(TASKS), default="fill",
                        help="fill: the Fill outlines, fill IoU; canny: edges of captioned shapes, edge F1 with "
                        "and without the prompt (default: fill)")
    parser.add_argument("--train_examples", type=int, default=4000, help="(default: 4000)")
    parser.add_argument("--held_out", type=int, default=16, help="held-out outlines scored (default: 16)")
    parser.add_argument("--flags", default="--resolution 64 --train_batch_size 16 --learning_rate 1e-3 "
                        "--lr_scheduler constant", help="flags given to both programs (default: %(default)s)")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="an extra zeroconv run with these flags added (repeatable)")
    parser.add_argument("--skip_peer", action="store_true", help="race only zeroconv's runs (a variant study)")
    parser.add_argument("--skip_same_start", action="store_true",
                        help="leave out the 'zeroconv' row (zeroconv from the peer's paper-init start) and race only "
                             "the variants, e.g. own=\"--condition_encoder_init unit_variance\"")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run at once, each with CPU cores / jobs threads; on a small CPU two 1-thread "
                        "runs of the toy base finish sooner than two 2-thread runs in turn (default: 1)")
    parser.add_argument("--work", default="learn-race", help="working folder, reused (default: learn-race)")
    parser.add_argument("--target", type=float, default=0.8,
                        help="the table's last column: the first scored step at which each seed reaches this score "
                        "(issue 18's fill IoU 0.80; score more steps for a finer figure) (default: 0.8)")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args()
    if args.skip_same_start and not args.variant:
        parser.error("--skip_same_start leaves no zeroconv run: add a --variant NAME=\"FLAGS\"")
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
    data, held = write_data(work, args.task, args.train_examples, args.held_out, resolution)
    programs = (([] if args.skip_peer else [("peer", "peer", [])])
                + ([] if args.skip_same_start else [("zeroconv", "zeroconv", [])]))
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        programs.append((f"zeroconv {name}", "zeroconv", shlex.split(flags)))
    last = max(args.score_steps)
    base = load_base("toy")
    results: dict[str, dict[int, dict[str, dict[int, float]]]] = {}
    walls: dict[str, list[float]] = {}
    runs = []  # (label, seed, command, out), alternating who goes first: the machine drifts
    for k, seed in enumerate(args.seeds):
        common = ["--pretrained_model_name_or_path", toy_base(), "--train_data_dir", str(data),
                  *shlex.split(args.flags), "--max_train_steps", str(last),
                  "--checkpointing_steps", str(min(args.score_steps)), "--seed", str(seed)]
        for label, program, extra in (programs if k % 2 == 0 else programs[::-1]):
            out = work / f"{label.replace(' ', '-')}-seed{seed}"
            extra, init = split_init(extra)
            flags = [*common[:2], "--controlnet_model_name_or_path", str(write_init(work, seed, init)), *common[2:],
                     *extra, "--output_dir", str(out)]
            if program == "zeroconv":
                out = zeroconv_run_folder(work, out, flags, last)
            runs.append((label, seed, train_command(program, args.peer, flags), out))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def train_one(run) -> float:
        label, seed, command, out = run
        print(f"seed {seed}: {label} ...", file=sys.stderr, flush=True)
        seconds = run_training(label, command, out, last, threads)
        if seconds is None and (out / "race_wall_seconds.txt").is_file():
            seconds = float((out / "race_wall_seconds.txt").read_text())
        return seconds or float("nan")

    with ThreadPoolExecutor(args.jobs) as pool:
        seconds = list(pool.map(train_one, runs))
    for (label, seed, _, out), wall in zip(runs, seconds):
        walls.setdefault(label, []).append(wall)
        results.setdefault(label, {})[seed] = score(out, args.score_steps, args.task, held, base)

    _, key, _ = TASKS[args.task]
    print(f"\nheld-out {key} ({args.held_out} examples), mean (min-max) over seeds {args.seeds}; toy base, "
          f"{args.train_examples} {args.task} examples, flags: {args.flags}")
    modes = list(next(iter(next(iter(results.values())).values())))
    width = max(26, *map(len, results)) + 2  # 28 as before; a longer variant name widens the column
    print(f"{'program':<{width}}{'sampled with':<14}" + "".join(f"{'step ' + str(s):>20}" for s in args.score_steps)
          + f"{'train wall s':>14}{'>= ' + format(args.target, 'g') + ' at step':>22}")
    for label, by_seed in results.items():
        for mode in modes:
            cells = "".join(f"{summarize([by_seed[s][mode][step] for s in args.seeds]):>20}"
                            for step in args.score_steps)
            reached = "/".join(first_reaching(by_seed[s][mode], args.target) for s in args.seeds)
            print(f"{label:<{width}}{mode:<14}{cells}{statistics.fmean(walls[label]):>14.0f}{reached:>22}")
    print("\nper seed:")
    for label, by_seed in results.items():
        for seed in args.seeds:
            for mode in modes:
                print(f"  {label:<{width - 2}} seed {seed} {mode:<10}: "
                      + "  ".join(f"{by_seed[seed][mode][s]:.3f}" for s in args.score_steps))
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "flags": args.flags, "seeds": args.seeds,
                                               "sampler": SAMPLER,
                                               "results": results, "train_wall_seconds": walls}, indent=1))


if __name__ == "__main__":
    main()
