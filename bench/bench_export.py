"""Export speed and memory on a full-size SD 1.5 ControlNet (361M parameters, random weights built in code).

Each command runs in a fresh process (as a user runs it); figures are its wall time from interpreter start
and its peak resident memory, against the model's size (fp32, as training saves it). Target: <= 30 s and
<= 2.5x the model's size.

    .venv/bin/python bench/bench_export.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Peak RSS is the kernel's VmHWM of this process image (ru_maxrss would carry the parent's peak across exec).
MEASURE = """
import json, sys, time
start = time.perf_counter()
from zeroconv import cli
code = cli.main(sys.argv[1:])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "seconds_in_process": time.perf_counter() - start, "peak_rss_bytes": hwm * 1024}))
"""


def build_sd15_controlnet(folder: Path) -> int:
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    # SD 1.5's UNet config (diffusers' defaults but CLIP ViT-L's 768-wide text states) and the 8x condition encoder.
    controlnet = ControlNetModel(cross_attention_dim=768, attention_head_dim=8)
    controlnet.save_pretrained(folder)
    return sum(p.numel() for p in controlnet.parameters())


def run(argv: list[str], code: str = MEASURE) -> dict:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {**figures, "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="work in this folder and keep the files (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "controlnet-sd15"
    start = time.perf_counter()
    params = build_sd15_controlnet(model)  # its memory is this process's, not the measured commands'
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"model: {params / 1e6:.1f}M parameters, {model_bytes / 2**30:.2f} GiB fp32 "
          f"(built and saved in {time.perf_counter() - start:.1f} s)")
    cases = [
        ("export original fp32", ["export", str(model), "--out", str(work / "cn-fp32.safetensors")]),
        ("export original fp16", ["export", str(model), "--dtype", "fp16", "--out", str(work / "cn-fp16.safetensors")]),
        ("export diffusers fp16", ["export", str(model), "--format", "diffusers", "--dtype", "fp16",
                                   "--out", str(work / "cn-diffusers-fp16")]),
        ("import original fp32", ["import", str(work / "cn-fp32.safetensors"), "--out", str(work / "imported")]),
    ]
    print(f"{'command':<24} {'wall s':>7} {'in-process s':>13} {'peak RSS GiB':>13} {'x model':>8}")
    for name, argv in cases:
        figures = run(argv)
        print(f"{name:<24} {figures['wall_seconds']:>7.1f} {figures['seconds_in_process']:>13.1f} "
              f"{figures['peak_rss_bytes'] / 2**30:>13.2f} {figures['peak_rss_bytes'] / model_bytes:>8.2f}")
    baseline = run([], MEASURE.replace("code = cli.main(sys.argv[1:])", "import torch, diffusers, safetensors; code = 0"))
    print(f"{'(imports only)':<24} {baseline['wall_seconds']:>7.1f} {baseline['seconds_in_process']:>13.1f} "
          f"{baseline['peak_rss_bytes'] / 2**30:>13.2f} {baseline['peak_rss_bytes'] / model_bytes:>8.2f}")
    if not args.keep:
        import shutil

        shutil.rmtree(work)


if __name__ == "__main__":
    main()
