"""The end of a finished run: the trained weights in diffusers layout, train_summary.json with the
controllability table, the model card and, with --report, the page once more."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zeroconv.card import write_model_card
from zeroconv.evaluate.curve import curves_from_rows, format_table, summarize
from zeroconv.hub import DECODER_FOLDER, RAW_FOLDER
from zeroconv.jsonl import read_growing

if TYPE_CHECKING:
    from zeroconv.train.run import TrainingRun


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_controlnet(controlnet, folder: Path, dtype: torch.dtype) -> None:
    """--save_weight_dtype: a cast copy is saved, so the live (float32) weights stay exact for what follows."""
    if dtype != torch.float32:
        import copy

        controlnet = copy.deepcopy(controlnet).to(dtype)
    controlnet.save_pretrained(folder, safe_serialization=True)


def save_final(run: TrainingRun) -> Path:
    """The trained ControlNet in diffusers layout in output_dir (with --use_ema its average, the trained weights in
    output_dir/without_ema), and the trained decoder as a full UNet. Every process calls it."""
    out = Path(run.cfg.output_dir)
    run.accelerator.wait_for_everyone()
    controlnet = run.full_controlnet()  # under DeepSpeed/FSDP gathered, every process taking part; written once
    dtype = SAVE_DTYPES[run.cfg.save_weight_dtype]
    if run.ema is not None and controlnet is not None:  # the main process: the trained weights beside the average
        save_controlnet(controlnet, out / RAW_FOLDER, dtype)
    # output_dir: with --use_ema the average, the model users load; every process enters (FSDP gathers it)
    with run.averaged(controlnet) as controlnet:
        if controlnet is not None:
            save_controlnet(controlnet, out, dtype)
    if run.accelerator.is_main_process:
        if not run.cfg.sd_locked:
            run.accelerator.unwrap_model(run.unet).save_pretrained(out / DECODER_FOLDER, safe_serialization=True)
        summary = {"global_step": run.state.global_step, "processes": run.accelerator.num_processes,
                   "effective_batch": effective_batch(run), "skipped_samples": run.state.skipped_samples,
                   "nonfinite_steps": run.state.nonfinite_steps, "nonfinite_log": run.state.nonfinite_log,
                   "controllability": report_controllability(out / "metrics.jsonl"),
                   "seconds": {k: round(v, 3) for k, v in run.seconds.items()}}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        write_card(run, out)
        if run.cfg.report:  # once more, so the page shows the finished run's counters
            from zeroconv.report import refresh_report

            refresh_report(out)
    run.accelerator.wait_for_everyone()
    return out


def report_controllability(metrics_file: Path) -> dict:
    """Print the validation metrics over steps and summarize each curve (baseline, best, when control appeared)."""
    curves = curves_from_rows(read_growing(metrics_file))
    if not curves:
        return {}
    print("controllability over training steps (validation set):\n" + format_table(curves), file=sys.stderr)
    summaries = {key: summarize(curve, key) for key, curve in curves.items()}
    for key, s in summaries.items():
        if s.get("baseline") is not None:
            appeared = (f"control appeared at step {s['control_appeared_at']}" if s["control_appeared_at"]
                        else "no gain over the base yet")
            print(f"{key}: base alone {s['baseline']:.3f} -> best {s['best']:.3f} at step {s['best_step']}; "
                  f"{appeared}", file=sys.stderr)
    return summaries


def effective_batch(run: TrainingRun) -> int:
    """Samples per optimizer step, over every process."""
    return run.cfg.train_batch_size * run.cfg.gradient_accumulation_steps * run.accelerator.num_processes


def write_card(run: TrainingRun, out: Path) -> None:
    cfg = run.cfg
    validation = {k: v for row in run.metrics_log for k, v in row.items() if k.startswith("validation/")}
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    write_model_card(out, {
        "base_model": cfg.pretrained_model_name_or_path,
        "condition": cfg.condition or cfg.conditioning_image_column,
        "dataset": cfg.dataset_name or cfg.train_data_dir or cfg.jsonl_for_train,
        "steps": run.state.global_step,
        "effective_batch": effective_batch(run),
        "resolution": cfg.resolution,
        "controllability": validation,
        "validation_grid": str(grids[-1].relative_to(out)) if grids else None,
        "sd_locked": cfg.sd_locked,
        "only_mid_control": cfg.only_mid_control,
    })
