"""Wall time and memory: diffusers' train_controlnet.py against `zeroconv train`, the same command, alternated.

    python bench/race.py --peer PATH/train_controlnet.py [--configs tiny base256] [--pairs 3] [--steps 200]

A user who switches changes the program name and nothing else, so both get the same flags (batch 16, lr 1e-5,
no validation, one checkpoint at the end) and each keeps its own defaults for the rest: zeroconv's latent cache,
channels_last rule, fused optimizer and `--mixed_precision auto` (bf16 where the hardware has bf16 matmuls: a GPU,
or a CPU with AVX512-BF16/AMX from 256 px) are on by default, where diffusers' script trains in fp32 unless told;
that is what the race measures. Per config, N pairs
run one after the other, the order alternating (peer first, then zeroconv first: a drifting machine favours
neither), each program in a fresh process with the same environment: the caller's, as a user runs them
(OMP_WAIT_POLICY is not forced as in bench/learn_race.py). Per run: the whole-process wall time (from
the command to its exit, start-up and final save included) and its peak RSS (the kernel's, from wait4). Printed:
every pair's times, the ratio peer/zeroconv per pair and the median, the peak RSS of both, and zeroconv's own split
of its time (start-up to the first step, waiting for data, the steps), from its train_summary.json.

Configs (bases built in code, random weights, by zeroconv.bench.build_base; Fill data by zeroconv.data.synth):
- tiny: zeroconv.testing's tiny SD base, 64 px training on 64 px data.
- base256: a 3-level UNet (64/128/256 channels, zeroconv bench's "small"), 256 px training on data stored at
  512 px: the proportions of SD 1.5 (512 px training, 8x latent grid 64) on Fill50K, at a CPU's scale.
- sd15 (for a GPU): SD 1.5's shape (860M UNet, SD's VAE, a 12-layer CLIP), random weights, 512 px training on
  512 px data; add `--extra "--mixed_precision bf16"` to race both in bf16 (both programs take accelerate's flag),
  rather than zeroconv's default against the peer's.
  It is refused without CUDA: one step of it takes minutes on a CPU. The GPU race, on a machine with diffusers'
  script beside it:

      python bench/race.py --peer PATH/train_controlnet.py --configs sd15 --pairs 3 --steps 200 \
          --extra "--mixed_precision bf16" --json race-gpu.json

The peer runs as published (bench/peer_env only supplies the torchvision pieces it imports); nothing of it is in
this repo. A zeroconv run's first pair builds its latent cache; a cache found from an earlier pair is reused, as a
user's second run reuses it: the table says which runs built one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from learn_race import train_command, write_fill_imagefolder  # noqa: E402  (the same launcher and data)

# name: (base, training resolution, stored resolution, examples)
CONFIGS = {"tiny": ("tiny", 64, 64, 1000), "base256": ("small", 256, 512, 400), "sd15": ("sd15", 512, 512, 400)}
GPU_ONLY = {"sd15"}
FLAGS = "--train_batch_size 16 --learning_rate 1e-5 --lr_scheduler constant --checkpointing_steps 100000"


def timed_run(command: list[str], log: Path, env: dict) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one process."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss // 1024, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", required=True, help="diffusers' examples/controlnet/train_controlnet.py")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["tiny", "base256"],
                        help="tiny, base256 (CPU or GPU), sd15 (GPU only) (default: tiny base256)")
    parser.add_argument("--pairs", type=int, default=3, help="alternated pairs per config (default: 3)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every run (default: 200)")
    parser.add_argument("--extra", default="", help="flags added to both programs (default: none)")
    parser.add_argument("--work", default="race-work", help="working folder, reused (default: race-work)")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args()
    if not Path(args.peer).is_file():
        parser.error(f"--peer {args.peer}: no such file; fetch examples/controlnet/train_controlnet.py from a "
                     "diffusers checkout")
    gpu_only = sorted(GPU_ONLY.intersection(args.configs))
    if gpu_only:
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--configs {' '.join(gpu_only)}: needs a CUDA GPU (none is visible to torch here); "
                         "race tiny and base256 on a CPU")
    from zeroconv.bench import build_base

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # The user's environment, as they would run either program: unlike the learning race, OMP_WAIT_POLICY is not
    # forced to PASSIVE (which changes no number but halves a tiny step's speed on an idle machine); set it
    # outside to race under it. zeroconv's latent cache stays in the work dir.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(work / "xdg-cache")}
    report = {}
    for name in args.configs:
        base_name, resolution, stored, examples = CONFIGS[name]
        base = build_base(base_name, work / f"base-{base_name}")
        data = write_fill_imagefolder(work / f"data-{name}-{stored}px", examples, stored)
        flags = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--resolution",
                 str(resolution), "--max_train_steps", str(args.steps), "--seed", "0", *shlex.split(FLAGS),
                 *shlex.split(args.extra)]
        runs = {"peer": [], "zeroconv": []}
        for pair in range(args.pairs):
            order = ("peer", "zeroconv") if pair % 2 == 0 else ("zeroconv", "peer")
            for program in order:
                out = work / f"{name}-{program}-{pair}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"{name} pair {pair + 1}: {program} ...", file=sys.stderr, flush=True)
                wall, rss, code = timed_run(train_command(program, args.peer, [*flags, "--output_dir", str(out)]),
                                            work / f"{name}-{program}-{pair}.log", env)
                if code != 0:
                    raise SystemExit(f"{program} failed (exit {code}); see {work / f'{name}-{program}-{pair}.log'}")
                row = {"wall_s": wall, "peak_rss_mib": rss}
                print(f"{name} pair {pair + 1}: {program} {wall:.1f} s, peak RSS {rss} MiB", file=sys.stderr, flush=True)
                if program == "zeroconv":
                    summary = json.loads((out / "train_summary.json").read_text())
                    row["split_s"] = summary.get("seconds", {})
                    log = (work / f"{name}-{program}-{pair}.log").read_text()
                    row["built_cache"] = "latent cache: building" in log
                runs[program].append(row)
        report[name] = runs
        ratios = [p["wall_s"] / z["wall_s"] for p, z in zip(runs["peer"], runs["zeroconv"])]
        print(f"\n{name}: base {base_name}, {resolution} px training on data stored at {stored} px, {examples} "
              f"examples, {args.steps} steps, flags: {FLAGS} {args.extra}".rstrip())
        print(f"{'pair':<6}{'peer s':>10}{'zeroconv s':>12}{'peer/zeroconv':>15}{'peer RSS MiB':>14}"
              f"{'zeroconv RSS MiB':>18}   zeroconv split (start-up / data / steps s)")
        for k, (p, z) in enumerate(zip(runs["peer"], runs["zeroconv"])):
            split = z["split_s"]
            built = ", built its cache" if z["built_cache"] else ""
            print(f"{k + 1:<6}{p['wall_s']:>10.1f}{z['wall_s']:>12.1f}{ratios[k]:>15.2f}{p['peak_rss_mib']:>14}"
                  f"{z['peak_rss_mib']:>18}   {split.get('startup', 0):.1f} / {split.get('data', 0):.1f} / "
                  f"{split.get('steps', 0):.1f}{built}")
        print(f"median peer/zeroconv wall-time ratio: {statistics.median(ratios):.2f}; peak RSS median: peer "
              f"{statistics.median(p['peak_rss_mib'] for p in runs['peer'])} MiB, zeroconv "
              f"{statistics.median(z['peak_rss_mib'] for z in runs['zeroconv'])} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
