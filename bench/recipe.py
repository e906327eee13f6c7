"""The recipe study (issue 18): which training options learn control in fewer steps, on the demo's own task.

    python bench/recipe.py --work /work/recipe [--seeds 0 1 2] [--recipes defaults paper cubic ...]
                           [--recipe NAME="FLAGS"]... [--jobs 2]

Every run is `zeroconv demo` (toy base, its Fill data, 800 steps, batch 16, lr 1e-3, held-out outlines sampled
and scored by fill IoU every 50 steps) with one recipe's `zeroconv train` flags on top; seed S is the demo's
--seed S for every recipe, so within a seed the recipes differ by their flags only. A recipe's flags that the
demo has options for (the paper's --proportion_empty_prompts and --condition_encoder_init) go to those options,
the rest through the demo's --train_flags.

The table gives, per recipe, the held-out fill IoU at --score_steps as mean (min-max) over the seeds, circle color
accuracy at the last step, the step at which control appears (fill IoU first above 0.5, the demo's
definition) and the step at which 0.80 is first reached, per seed. Finished runs in --work are reused when their
command is the same, so an interrupted study continues where it stopped and a new recipe costs only its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# run as a file (`python bench/recipe.py`), bench/ is not a package on the path: the repo root makes it one
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.learn_race import summarize  # noqa: E402  mean (min-max), as the learning race prints it


# issue 18's levers, each alone over zeroconv's defaults, and the paper's settings to beat
RECIPES = {
    "defaults": "",
    "paper": "--proportion_empty_prompts 0.5 --condition_encoder_init paper",
    "cubic": "--timestep_sampling cubic",
    "cubic_then_uniform": "--timestep_sampling cubic_then_uniform",
    "logit_normal": "--timestep_sampling logit_normal",
    "ema": "--use_ema",
    "snr5": "--snr_gamma 5",
    "consistency": "--consistency_loss_weight 1 --consistency_condition canny",
}
DEFAULT_RECIPES = ["defaults", "paper", "cubic", "logit_normal", "ema", "snr5", "consistency"]
# RUN_ENV: passive OpenMP waiting, as the demo sets it, so that --jobs 2 on a small CPU does not spin
RUN_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def demo_command(flags: str, seed: int, out: Path, max_train_steps: int, demo_flags: str = "") -> list[str]:
    """`zeroconv demo` (with `demo_flags`) and recipe `flags`: those the demo owns (zeroconv.demo.DEMO_OWNED) as
    its own options, the rest as its --train_flags."""
    from zeroconv.demo import DEMO_OWNED

    own, train, tokens = [], [], shlex.split(flags)
    i = 0
    while i < len(tokens):
        j = i + 1
        while j < len(tokens) and not tokens[j].startswith("--"):
            j += 1
        name = tokens[i].removeprefix("--")
        if name in DEMO_OWNED and DEMO_OWNED[name]:
            own += [f"--{DEMO_OWNED[name]}", *tokens[i + 1:j]]
        else:
            train += tokens[i:j]
        i = j
    command = [sys.executable, "-m", "zeroconv", "demo", "--output_dir", str(out), "--seed", str(seed),
               "--max_train_steps", str(max_train_steps), *shlex.split(demo_flags), *own]
    # one token with "=": as two, flags alone ("--use_ema") would read as an option of the demo, not its value
    return command + ([f"--train_flags={shlex.join(train)}"] if train else [])


def finished(out: Path, command: list[str]) -> bool:
    """A run of exactly `command` finished in `out` (its summary written, its command recorded)."""
    recorded = out / "recipe_command.json"
    return ((out / "summary.json").is_file() and recorded.is_file()
            and json.loads(recorded.read_text()) == command[1:]  # the interpreter's path does not matter
            and json.loads((out / "summary.json").read_text()).get("final") is not None)


def run(command: list[str], out: Path, threads: int) -> float:
    """Run one demo (unless finished); its wall seconds (as recorded when reused)."""
    wall_file = out / "recipe_wall_seconds.txt"
    if finished(out, command):
        return float(wall_file.read_text()) if wall_file.is_file() else float("nan")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe_command.json").unlink(missing_ok=True)
    env = {**RUN_ENV, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(out / "recipe_log.txt", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({code}); see {out / 'recipe_log.txt'}")
    wall_file.write_text(f"{seconds:.1f}")
    (out / "recipe_command.json").write_text(json.dumps(command[1:]))
    return seconds


def first_step(history: list[dict], key: str, above: float) -> int | None:
    return next((row["step"] for row in history if row[key] >= above), None)


def figures(out: Path, score_steps: list[int]) -> dict:
    from zeroconv.demo import first_step_with_control

    summary = json.loads((out / "summary.json").read_text())
    history = summary["history"]
    by_step = {row["step"]: row for row in history}
    missing = [s for s in score_steps if s not in by_step]
    if missing:
        raise SystemExit(f"{out}: no validation at step(s) {missing} (the demo validates every "
                         f"{summary['config']['validation_steps']} steps)")
    return {"fill_iou": {s: by_step[s]["fill_iou"] for s in score_steps},
            "circle_color": history[-1]["circle_color_accuracy"],
            "control_step": first_step_with_control(history),
            "reached_step": first_step(history, "fill_iou", 0.8),
            "baseline": summary["baseline"]["fill_iou"]}


def table(results: dict[str, dict[int, dict]], score_steps: list[int], target: float) -> str:
    header = ["recipe", *(f"@{s}" for s in score_steps), "circle color @end", "control at (seeds)",
              f">= {target} at (seeds)"]
    rows = [header, ["---"] * len(header)]
    for name, seeds in results.items():
        runs = [seeds[s] for s in sorted(seeds)]
        steps = lambda key: " / ".join("-" if r[key] is None else str(r[key]) for r in runs)  # noqa: E731
        rows.append([name, *(summarize([r["fill_iou"][s] for r in runs]) for s in score_steps),
                     summarize([r["circle_color"] for r in runs]), steps("control_step"), steps("reached_step")])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="recipe-study", help="working folder, reused (default: recipe-study)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=sorted(RECIPES), metavar="NAME",
                        help="built-in recipes to run, of: " + ", ".join(f"{k} ({v or 'no flags'})" for k, v in
                                                                          RECIPES.items())
                        + f" (default: {' '.join(DEFAULT_RECIPES)})")
    parser.add_argument("--recipe", action="append", default=[], metavar='NAME="FLAGS"',
                        help="another recipe: `zeroconv train` flags over the defaults, e.g. "
                        "best=\"--timestep_sampling cubic --use_ema\" (repeatable)")
    parser.add_argument("--score_steps", type=int, nargs="+", default=[100, 200, 400, 800],
                        help="steps in the table, multiples of the demo's --validation_steps (50); the largest is the runs' length "
                        "(default: 100 200 400 800)")
    parser.add_argument("--target", type=float, default=0.8, help="fill IoU of the last column (default: 0.8)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="demos run at once, each with CPU cores / jobs threads (default: 1)")
    parser.add_argument("--demo_flags", default="",
                        help="options of `zeroconv demo` for every run, e.g. \"--train_examples 1000\" (default: none)")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    recipes = {name: RECIPES[name] for name in args.recipes}
    for spec in args.recipe:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            parser.error(f"--recipe {spec!r}: expected NAME=\"FLAGS\"")
        recipes[name] = flags
    from zeroconv.config import parse
    from zeroconv.demo import DemoConfig

    every = parse(DemoConfig, shlex.split(args.demo_flags), prog="--demo_flags").validation_steps
    if any(s % every for s in args.score_steps):
        parser.error(f"--score_steps {args.score_steps}: the demo validates every {every} steps; use multiples")
    work, last = Path(args.work), max(args.score_steps)
    runs = [(name, seed, demo_command(flags, seed, work / name / f"seed{seed}", last, args.demo_flags),
             work / name / f"seed{seed}") for seed in args.seeds for name, flags in recipes.items()]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def one(item) -> float:
        name, seed, command, out = item
        print(f"{name}, seed {seed}: {shlex.join(command[1:])}", file=sys.stderr, flush=True)
        return run(command, out, threads)

    with ThreadPoolExecutor(args.jobs) as pool:
        walls = list(pool.map(one, runs))
    results: dict[str, dict[int, dict]] = {}
    for (name, seed, _, out), wall in zip(runs, walls):
        results.setdefault(name, {})[seed] = {**figures(out, args.score_steps), "wall_seconds": wall}
    baseline = [r["baseline"] for seeds in results.values() for r in seeds.values()]
    print(f"\nheld-out fill IoU on the demo task, mean (min-max) over seeds {args.seeds}; the toy base alone: "
          f"{summarize(baseline)}; control = fill IoU above 0.5")
    print(table(results, args.score_steps, args.target))
    print("\nrecipes: " + "; ".join(f"{name}: {flags or 'zeroconv train defaults'}" for name, flags in recipes.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"recipes": recipes, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
