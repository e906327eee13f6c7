"""`zeroconv synth fill` throughput at 512 px: images/s with 1 and 2 processes, and the time 50,000 would take.

Each run writes the whole Fill50K layout (source/ and target/ PNGs, prompt.json) into a fresh temporary folder,
worker start-up included. Figures are the best of `repeat` runs: load from other programs only slows runs down.

Run: PYTHONPATH=. .venv/bin/python bench/bench_synth.py [--images 500] [--repeat 2] [--resolution 512]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from zeroconv.data.synth import write_fill


def images_per_second(out: Path, n: int, resolution: int, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    write_fill(out, n, resolution, seed=0, palette="css", workers=workers, progress=False)
    seconds = time.perf_counter() - start
    written = len(list((out / "target").iterdir()))
    if written != n:
        raise SystemExit(f"expected {n} targets, found {written}")
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="images per run (default 500)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per setting; the best is reported (default 2)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default 512)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = {w: [images_per_second(Path(tmp) / f"w{w}", args.images, args.resolution, w)
                     for _ in range(args.repeat)] for w in (1, 2)}
    for workers, runs in rates.items():
        best = max(runs)
        print(f"{workers} process{'es' if workers > 1 else '  '}: {best:7.1f} images/s at {args.resolution} px "
              f"-> 50,000 in {50_000 / best / 60:5.1f} min   (all runs: {[round(r, 1) for r in runs]})")
    print(f"speed-up    : {max(rates[2]) / max(rates[1]):.2f}x")


if __name__ == "__main__":
    main()
