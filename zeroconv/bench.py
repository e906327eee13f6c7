"""`zeroconv bench`: training speed and memory of named configs, cached and uncached, against this machine's limit.

Each config is built in code (random weights, a synthetic dataset: colored squares at the training resolution,
or with --source_resolution N zeroconv.data.synth's Fill examples stored as N px PNGs, as Fill50K stores 512 px) and
written to a work folder; each variant then trains in a fresh process through the real `zeroconv train` setup and loop, so
its peak memory is its own. Per variant: samples/s, the step split into data, encoders (VAE + text encoder, or
the cache's read and latent draw), ControlNet forward, UNet forward, backward, optimizer and the rest, peak
memory (RSS from the kernel's VmHWM, reset after warm-up so the figure is the steady step's; on CUDA,
max_memory_allocated), the FLOPs of one step counted by torch.utils.flop_counter, and MFU: model FLOPs/s over a
matmul peak measured on this machine in the same run.

Configs: tiny (zeroconv.testing's tiny base), toy (the shipped toy base's architecture from
zeroconv.models.toy_base's builders, random weights, 64 px), small (UNet blocks 64/128/256, VAE and CLIP scaled down from SD's),
sd15 (SD 1.5's UNet, VAE and CLIP ViT-L shapes: a 361M-parameter ControlNet).

    zeroconv bench --config tiny small sd15 --json bench.json
    zeroconv bench --config tiny small --source_resolution 512   # data stored at 512 px, as Fill50K

`zeroconv bench --on_paper` computes instead the GPU figures of the true-shape SD 1.5, SDXL, SD3.5 and Flux
ControlNets on meta tensors (zeroconv.bench_paper).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from zeroconv.config import option, parse
from zeroconv.errors import EXIT_OK, UserError

# name: (resolution, batch size, timed steps, warm-up steps, dataset size, variants)
DEFAULTS = {
    "tiny": (64, 16, 20, 3, 64, ["uncached", "cached"]),
    "toy": (64, 16, 20, 3, 64, ["uncached", "cached"]),
    "small": (256, 4, 8, 2, 16, ["uncached", "cached"]),
    "sd15": (256, 1, 1, 1, 2, ["uncached", "cached", "cached+gc"]),
}
BUCKETS = ("data", "encoders", "controlnet_forward", "unet_forward", "backward", "optimizer")


@dataclass
class BenchConfig:
    configs: list[str] = option(["tiny"], "Configs to run, in order: tiny, toy, small, sd15 (also spelled --config "
                                "NAME...; --config FILE.yaml still reads options from a file).")
    resolution: int | None = option(None, "Training resolution (default: tiny 64, toy 64, small 256, sd15 256; "
                                    "--on_paper: sd15 512, sdxl sd35 sd35m flux 1024).")
    batch_size: int | None = option(None, "Batch size (default: tiny 16, toy 16, small 4, sd15 1; --on_paper: the "
                                    "memory table's batch, 8).")
    steps: int | None = option(None, "Timed steps per variant (default: tiny 20, toy 20, small 8, sd15 1).")
    warmup: int | None = option(None, "Untimed steps first (default: tiny 3, toy 3, small 2, sd15 1); the first one is "
                                "also the one whose FLOPs are counted.")
    variants: list[str] | None = option(
        None, "Variants: cached or uncached, each optionally with +gc (gradient checkpointing), +cl (channels_last "
        "on), +nocl (off; without either, zeroconv train's auto rule), +compile (default: uncached cached; sd15 adds "
        "cached+gc).")
    repeats: int = option(1, "Run each config's variants this many times, interleaved; figures are medians.")
    threads: int = option(0, "Torch CPU threads of every variant and of the matmul peak (0: torch's default, "
                          "the number of cores). On a machine shared with other jobs, fewer threads than cores keep "
                          "each parallel region from waiting on a descheduled thread.")
    source_resolution: int = option(
        0, "Side in pixels of the stored images of the bench's synthetic dataset (default 0: the training "
        "resolution, colored squares, so the uncached loader decodes small PNGs and does not resize). N writes "
        "zeroconv synth fill's "
        "Fill50K-layout examples (prompt.json, source/ and target/ PNGs) at N x N, e.g. 512 as Fill50K: the uncached "
        "loader then decodes N px PNGs and resizes them to the training resolution every step, as real datasets "
        "stored larger than the training resolution do; the cache is built once from the same files.")
    on_paper: bool = option(False, "Instead of training here: build the true-shape SD 1.5, SDXL, SD3.5 and Flux "
                            "ControlNets and their frozen parts on meta tensors (no memory, no download) and print "
                            "their parameters, FLOPs per sample of each part with and without the cache, samples/s "
                            "on an H100/H200 at --mfu, and GPU memory per recipe (zeroconv.bench_paper).")
    families: list[str] = option(["sd15", "sdxl", "sd35", "flux"], "--on_paper: families to compute: sd15, sdxl, "
                                 "sd35 (3.5 Large), sd35m (3.5 Medium), flux (FLUX.1-dev); tiny, tiny-sd3, tiny-flux "
                                 "are test shapes.")
    mfu: float = option(0.4, "--on_paper: model FLOPs utilization the samples/s figures assume (a fraction).")
    json: str | None = option(None, "Also write every figure to this JSON file.")
    workdir: str | None = option(None, "Keep the built bases, datasets and caches here (default: a temp folder).")


# ----------------------------------------------------------------------------------------------------------------
# The configs, built in code
# ----------------------------------------------------------------------------------------------------------------

def build_base(name: str, folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from zeroconv.models.tokenizer import write_clip_tokenizer
    from zeroconv.testing import TINY_WORDS, make_tiny_base, sd_scheduler

    if (folder / "model_index.json").is_file():
        return folder
    if name == "tiny":
        return make_tiny_base(folder)
    torch.manual_seed(0)
    if name == "toy":  # the architecture zeroconv ships and trains in its demo, with fresh random weights
        from zeroconv.models import toy_base

        tokenizer = write_clip_tokenizer(folder / "tokenizer", toy_base.vocabulary(),
                                         model_max_length=toy_base.MAX_PROMPT_TOKENS)
        toy_base.save_pipeline(folder, toy_base.build_vae(), toy_base.build_text_encoder(tokenizer), tokenizer,
                               toy_base.build_unet())
        return folder
    tokenizer = write_clip_tokenizer(folder / "tokenizer", TINY_WORDS)
    if name == "small":
        unet = UNet2DConditionModel(
            block_out_channels=(64, 128, 256), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, layers_per_block=2,
            cross_attention_dim=256, attention_head_dim=8, sample_size=32)
        vae_channels, text = (32, 64, 128, 128), dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                                      num_attention_heads=4)
    elif name == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # SD 1.5's
        vae_channels, text = (128, 256, 512, 512), dict(hidden_size=768, intermediate_size=3072,
                                                        num_hidden_layers=12, num_attention_heads=12)
    else:
        raise UserError(f"--config {name}: unknown; use tiny, toy, small or sd15")
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=vae_channels, layers_per_block=2, latent_channels=4,
                        sample_size=unet.config.sample_size * 8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, projection_dim=text["hidden_size"],
        hidden_act="quick_gelu", **text))
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def matmul_peak_flops(seconds: float = 3.0, n: int = 1024) -> float:
    """The best fp32 matmul rate of this process's threads: the ceiling MFU is measured against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - tick))
    return best


# ----------------------------------------------------------------------------------------------------------------
# One variant, in its own process
# ----------------------------------------------------------------------------------------------------------------

def status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


class StepClock:
    """Seconds per bucket, summed over steps; on CUDA each interval ends with a synchronize."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = dict.fromkeys(BUCKETS, 0.0)
        self.started: dict[str, float] = {}

    def start(self, bucket: str) -> None:
        self.sync()
        self.started[bucket] = time.perf_counter()

    def stop(self, bucket: str) -> None:
        self.sync()
        self.totals[bucket] += time.perf_counter() - self.started.pop(bucket)

    def wrap(self, bucket: str, fn):
        def timed(*args, **kwargs):
            self.start(bucket)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(bucket)
        return timed

    def hook(self, module, bucket: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(bucket))
        module.register_forward_hook(lambda *_: self.stop(bucket))

    def reset(self) -> None:
        self.totals = dict.fromkeys(BUCKETS, 0.0)


def instrument(t, clock: StepClock, flops: dict) -> None:
    """Time each part of the real loop's step, and count the encoders' FLOPs while `flops["on"]`."""
    from torch.utils.flop_counter import FlopCounterMode

    batches = t.batches

    def timed_batches():
        while True:
            clock.start("data")
            batch = next(batches)
            clock.stop("data")
            yield batch

    t.batches = timed_batches()
    for name in ("latents", "prompts"):
        fn = getattr(t.encoders, name)

        def counted(*args, _fn=fn, **kwargs):
            if not flops["on"]:
                return _fn(*args, **kwargs)
            with FlopCounterMode(display=False) as counter:
                out = _fn(*args, **kwargs)
            flops["encoders"] += counter.get_total_flops()
            return out

        setattr(t.encoders, name, clock.wrap("encoders", counted))
    clock.hook(t.accelerator.unwrap_model(t.controlnet), "controlnet_forward")
    clock.hook(t.accelerator.unwrap_model(t.unet), "unet_forward")
    t.accelerator.backward = clock.wrap("backward", t.accelerator.backward)
    t.accelerator.clip_grad_norm_ = clock.wrap("optimizer", t.accelerator.clip_grad_norm_)
    t.optimizer.step = clock.wrap("optimizer", t.optimizer.step)
    t.optimizer.zero_grad = clock.wrap("optimizer", t.optimizer.zero_grad)


def count_cpu_attention_flops() -> None:
    """torch.utils.flop_counter counts CUDA's SDPA kernels but not the CPU flash-attention ones that SDPA runs on
    CPU: without this the FLOPs (and MFU) of every attention layer would be left out. Same formulas as CUDA's."""
    from torch.utils import flop_counter

    aten = __import__("torch").ops.aten
    forward, backward = aten._scaled_dot_product_flash_attention_for_cpu, \
        aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(forward)(
            lambda query, key, value, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_flop_count(query, key, value))
    if backward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(backward)(
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_backward_flop_count(grad_out, query, key, value))


def run_variant(spec: dict) -> dict:
    """Train `spec["warmup"]` steps (the first under a FLOP counter), then `spec["steps"]` timed ones."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from zeroconv.config import TrainConfig
    from zeroconv.train.loop import train_loop
    from zeroconv.train.run import setup

    parts = spec["variant"].split("+")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    count_cpu_attention_flops()
    load_before = os.getloadavg()[0]
    cfg = TrainConfig(
        pretrained_model_name_or_path=spec["base"], train_data_dir=spec["data"], output_dir=spec["output_dir"],
        resolution=spec["resolution"], train_batch_size=spec["batch_size"], max_train_steps=1, seed=0,
        learning_rate=1e-5, lr_warmup_steps=0, checkpointing_steps=10**9, validation_steps=10**9,
        logging_steps=10**9, report_to="none", mixed_precision="no", cache="auto" if "cached" in parts else "off",
        latent_cache_dir=spec["cache_dir"], gradient_checkpointing="gc" in parts, compile="compile" in parts,
        channels_last=True if "cl" in parts else False if "nocl" in parts else None, dataloader_num_workers=0)
    start = time.perf_counter()
    t = setup(cfg)
    t.progress.disable = True
    setup_seconds = time.perf_counter() - start
    rss_after_setup = status_kib("VmRSS") * 1024
    clock, flops = StepClock(t.device), {"on": True, "encoders": 0}
    instrument(t, clock, flops)
    with FlopCounterMode(display=False) as counter:
        train_loop(t)
    flops["on"] = False
    step_flops = counter.get_total_flops()
    t.max_train_steps = spec["warmup"]
    train_loop(t)
    rss_setup_peak = status_kib("VmHWM") * 1024
    rss_before_timed = status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as fh:  # VmHWM from here on: the steady step's peak
        fh.write("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock.reset()
    t.max_train_steps = spec["warmup"] + spec["steps"]
    start, cpu_start = time.perf_counter(), time.process_time()
    train_loop(t)
    elapsed, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    steps, batch = spec["steps"], spec["batch_size"]
    per_step = {k: v / steps for k, v in clock.totals.items()}
    per_step["other"] = max(0.0, elapsed / steps - sum(per_step.values()))
    model_flops = (step_flops - flops["encoders"]) / batch
    samples_per_s = steps * batch / elapsed
    return {
        "config": spec["config"], "variant": spec["variant"], "resolution": spec["resolution"],
        "source_resolution": spec.get("source_resolution") or spec["resolution"], "batch_size": batch,
        "steps": steps, "samples_per_s": samples_per_s, "step_seconds": elapsed / steps,
        # CPU seconds of all this process's threads: less sensitive than wall time to other processes' load
        "samples_per_cpu_s": steps * batch / cpu_seconds, "step_cpu_seconds": cpu_seconds / steps,
        "step_breakdown_seconds": per_step, "setup_seconds": setup_seconds,
        "peak_rss_bytes": status_kib("VmHWM") * 1024, "peak_rss_with_setup_bytes": max(rss_setup_peak,
                                                                                    status_kib("VmHWM") * 1024),
        "rss_after_setup_bytes": rss_after_setup, "rss_before_timed_steps_bytes": rss_before_timed,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "model_flops_per_sample": model_flops, "encoder_flops_per_sample": flops["encoders"] / batch,
        "model_flops_per_s": model_flops * samples_per_s,
        "controlnet_parameters": sum(p.numel() for p in t.accelerator.unwrap_model(t.controlnet).parameters()),
        "threads": torch.get_num_threads(), "load_average": [load_before, os.getloadavg()[0]],
    }


def worker() -> None:
    """Entry of a variant's process: spec JSON in argv[1], result JSON as the last line of stdout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_variant(json.loads(sys.argv[1]))
    print(json.dumps(result))


def in_subprocess(spec: dict, code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"{spec.get('config')} {spec.get('variant')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cache_worker() -> None:
    """Entry of the cache build's process (its own, so its peak memory is its own): spec JSON in argv[1]."""
    from zeroconv.config import TrainConfig
    from zeroconv.train.cache import build_for_training

    spec = json.loads(sys.argv[1])
    start = time.perf_counter()
    cache = build_for_training(TrainConfig(
        pretrained_model_name_or_path=spec["base"], train_data_dir=spec["data"], resolution=spec["resolution"],
        train_batch_size=spec["batch_size"], seed=0, mixed_precision="no", latent_cache_dir=spec["cache_dir"]))
    size = sum(p.stat().st_size for p in cache.folder.iterdir())
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": status_kib("VmHWM") * 1024,
                      "bytes": size}))


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------

def median_result(runs: list[dict]) -> dict:
    """Medians over repeats of the timed figures; the rest from the first run."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[0])
    for key in ("samples_per_s", "step_seconds", "samples_per_cpu_s", "step_cpu_seconds", "peak_rss_bytes", "peak_rss_with_setup_bytes", "model_flops_per_s"):
        merged[key] = statistics.median(r[key] for r in runs)
    merged["step_breakdown_seconds"] = {k: statistics.median(r["step_breakdown_seconds"][k] for r in runs)
                                        for k in runs[0]["step_breakdown_seconds"]}
    merged["repeats"] = [r["samples_per_s"] for r in runs]
    return merged


def table(results: list[dict], peak: float) -> str:
    head = (f"{'config':<6} {'variant':<16} {'res':>4} {'src':>4} {'bs':>3} {'samples/s':>9} {'step s':>7} {'smp/cpu-s':>9} | "
            + " ".join(f"{b[:10]:>10}" for b in (*BUCKETS, "other"))
            + f" | {'peak RSS':>8} {'GFLOP/smp':>9} {'enc GF':>7} {'MFU':>6} {'load':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        split = " ".join(f"{r['step_breakdown_seconds'][b] * 1e3:>8.0f}ms" for b in (*BUCKETS, "other"))
        memory = r["cuda_max_allocated_bytes"] or r["peak_rss_bytes"]
        lines.append(
            f"{r['config']:<6} {r['variant']:<16} {r['resolution']:>4} {r.get('source_resolution', r['resolution']):>4} "
            f"{r['batch_size']:>3} {r['samples_per_s']:>9.2f} "
            f"{r['step_seconds']:>7.2f} {r['samples_per_cpu_s']:>9.2f} | {split} | {memory / 2**30:>6.2f}Gi {r['model_flops_per_sample'] / 1e9:>9.2f} "
            f"{r['encoder_flops_per_sample'] / 1e9:>7.2f} {r['model_flops_per_s'] / peak:>6.1%} "
            f"{r['load_average'][0]:>4.1f}/{r['load_average'][1]:<4.1f}")
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict:
    """cached / uncached samples/s and peak RSS per config (variants without extra options)."""
    out = {}
    for config in dict.fromkeys(r["config"] for r in results):
        by_variant = {r["variant"]: r for r in results if r["config"] == config}
        if {"cached", "uncached"} <= set(by_variant):
            cached, uncached = by_variant["cached"], by_variant["uncached"]
            out[config] = {"speedup": cached["samples_per_s"] / uncached["samples_per_s"],
                           "speedup_cpu_time": cached["samples_per_cpu_s"] / uncached["samples_per_cpu_s"],
                           "peak_rss_ratio": cached["peak_rss_bytes"] / uncached["peak_rss_bytes"]}
        if {"cached", "cached+gc"} <= set(by_variant):
            out.setdefault(config, {})["gc_peak_rss_ratio"] = (by_variant["cached+gc"]["peak_rss_bytes"]
                                                               / by_variant["cached"]["peak_rss_bytes"])
    return out


def bench_dataset(folder: Path, n: int, resolution: int, source_resolution: int) -> tuple[Path, dict]:
    """The config's synthetic training set under `folder`, written once and reused: at the training resolution
    (colored squares, the default), or `source_resolution` px Fill examples in Fill50K's layout (PNG)."""
    if not source_resolution:
        from zeroconv.testing import make_image_dataset

        data = folder / f"data-{resolution}"
        if not (data / "metadata.jsonl").is_file():
            make_image_dataset(data, n=n, size=resolution)
        kind = f"{n} colored squares at {resolution} px (PNG, the training resolution)"
    else:
        from zeroconv.data.synth import write_fill

        data = folder / f"fill-{source_resolution}px-{n}"
        if not (data / "prompt.json").is_file():
            write_fill(data, n, resolution=source_resolution, seed=0, palette="css", workers=1, overwrite=True,
                       progress=False)
        kind = (f"{n} Fill examples at {source_resolution} px (PNG, Fill50K layout), resized to {resolution} px "
                f"by the uncached loader every step")
    files = [p for p in data.rglob("*.png")]
    info = {"folder": str(data), "examples": n, "source_resolution": source_resolution or resolution,
            "png_bytes": sum(p.stat().st_size for p in files)}
    info["description"] = f"{kind}, {info['png_bytes'] / len(files) / 1024:.1f} KiB a PNG on average"
    return data, info


def config_names_as_configs(argv: list[str]) -> list[str]:
    """`--config tiny small` names configs (the issue's spelling); `--config run.yaml` stays the YAML option."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--config" and out[i + 1] in DEFAULTS:
            out[i] = "--configs"
    return out


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    cfg = parse(BenchConfig, config_names_as_configs(list(sys.argv[1:] if argv is None else argv)),
                prog="zeroconv bench", description=__doc__.split("\n\n")[0])
    if cfg.on_paper:  # figures from shapes alone: nothing of the training bench below runs
        from zeroconv import bench_paper

        return bench_paper.main(cfg)
    for name in cfg.configs:
        if name not in DEFAULTS:
            raise UserError(f"--config {name}: unknown; use tiny, toy, small or sd15")
    if cfg.source_resolution and cfg.source_resolution < 16:
        raise UserError(f"--source_resolution {cfg.source_resolution}: must be at least 16 pixels (or 0: the "
                        "training resolution)")
    for variant in cfg.variants or []:
        parts = variant.split("+")
        if parts[0] not in ("cached", "uncached") or not set(parts[1:]) <= {"gc", "cl", "nocl", "compile"}:
            raise UserError(f"--variants {variant}: expected cached or uncached, optionally +gc, +cl, +nocl, +compile")
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="zeroconv_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    peak = matmul_peak_flops()
    print(f"matmul peak (fp32, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results, builds, datasets = [], {}, {}
    for name in cfg.configs:
        resolution, batch, steps, warmup, samples, variants = DEFAULTS[name]
        resolution, batch = cfg.resolution or resolution, cfg.batch_size or batch
        steps, warmup = cfg.steps or steps, cfg.warmup or warmup
        variants = cfg.variants or variants
        base = build_base(name, work / name / "base")
        data, datasets[name] = bench_dataset(work / name, max(samples, batch), resolution, cfg.source_resolution)
        print(f"{name}: dataset {datasets[name]['description']}", flush=True)
        common = {"config": name, "base": str(base), "data": str(data), "resolution": resolution, "batch_size": batch,
                  "source_resolution": datasets[name]["source_resolution"], "cache_dir": str(work / name / "cache"),
                  "steps": steps, "warmup": warmup, "threads": cfg.threads}
        builds[name] = in_subprocess(common, "from zeroconv.bench import cache_worker; cache_worker()")
        print(f"{name}: cache built in {builds[name]['seconds']:.1f} s ({builds[name]['bytes'] / 2**20:.1f} MiB)",
              flush=True)
        runs: dict[str, list] = {}
        for _ in tqdm(range(cfg.repeats), desc=name, disable=cfg.repeats == 1):
            for variant in variants:
                spec = {**common, "variant": variant, "output_dir": str(work / name / "out" / variant)}
                runs.setdefault(variant, []).append(in_subprocess(spec, "from zeroconv.bench import worker; worker()"))
                r = runs[variant][-1]
                print(f"  {name} {variant}: {r['samples_per_s']:.2f} samples/s, peak RSS "
                      f"{r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        results += [median_result(runs[v]) for v in variants]
    print()
    print(table(results, peak))
    summary = ratios(results)
    for config, figures in summary.items():
        print(f"{config}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"matmul_peak_flops": peak, "bench": asdict(cfg), "cache_builds": builds,
                                              "datasets": datasets,
                                              "results": results, "ratios": summary,
                                              "cpu_count": os.cpu_count()}, indent=1))
    return EXIT_OK
