"""Everything `zeroconv train` can check before loading a model, each mistake one line naming the fix.

Order matters for the user: paths, columns, flags, output folder, optional packages and hub access are checked
in a second, not after minutes of loading.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from zeroconv.config import TrainConfig, check_train_config
from zeroconv.data.conditions import get_extractor
from zeroconv.data.sources import Examples, open_examples
from zeroconv.errors import UserError
from zeroconv.evaluate.metrics import get_metric
from zeroconv.hub import check_push_possible
from zeroconv.models.locate import check_base_arg


# ----------------------------------------------------------------------------------------------------------------

def check_output_dir(output_dir: str) -> None:
    # Every process of a launch probes the same folder at once: a probe with one shared name was unlinked by one
    # process while another wrote it (ENOENT read as "cannot write"), so each probe is a unique temporary file.
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".zeroconv-write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"--output_dir {output_dir}: cannot write there ({exc.strerror}); pick a writable folder") \
            from None


def check_disk_space(output_dir: str, needed_bytes: int) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise UserError(f"--output_dir {output_dir}: {free / 2**30:.1f} GiB free, the planned checkpoints need about "
                        f"{needed_bytes / 2**30:.1f} GiB; free space, lower --checkpoints_total_limit or raise "
                        "--checkpointing_steps")


def check_optional_packages(cfg: TrainConfig) -> None:
    import importlib.util

    if cfg.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA GPUs only), or drop "
                            "the flag")
        if not torch.cuda.is_available():
            raise UserError("--use_8bit_adam needs a CUDA GPU (bitsandbytes); drop the flag on CPU")
    if cfg.enable_model_cpu_offload and not torch.cuda.is_available():
        raise UserError("--enable_model_cpu_offload moves validation's models between a GPU and the CPU; there is "
                        "no GPU here, so every model is on the CPU already: drop the flag")
    for tracker in tracker_names(cfg.report_to):
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml"}.get(tracker)
        if module is None:
            raise UserError(f"--report_to {cfg.report_to}: unknown tracker '{tracker}'; use tensorboard, wandb, "
                            "comet_ml, all or none")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report_to {tracker}: {module} is not installed; pip install {module}, or use "
                            "--report_to tensorboard")


def tracker_names(report_to: str | None) -> list[str]:
    if not report_to or report_to == "none":
        return []
    if report_to == "all":
        import importlib.util

        return [name for name in ("tensorboard", "wandb", "comet_ml") if importlib.util.find_spec(name)]
    return [name.strip() for name in report_to.split(",") if name.strip()]


@dataclass
class Checked:
    """What preflight had to open to check it, handed to set-up so nothing is read twice."""

    validation_pairs: list[tuple[str, str]]
    examples: Examples


def preflight(cfg: TrainConfig) -> Checked:
    """All checks that need no model."""
    check_base_arg(cfg.pretrained_model_name_or_path, revision=cfg.revision, cache_dir=cfg.cache_dir)
    if cfg.controlnet_model_name_or_path:
        path = Path(cfg.controlnet_model_name_or_path)
        if path.exists() and not (path / "config.json").is_file():
            raise UserError(f"--controlnet_model_name_or_path {path}: no config.json; expected a diffusers "
                            "ControlNet folder (use `zeroconv import` for a single file)")
    pairs = check_train_config(cfg)
    if cfg.condition:
        get_extractor(cfg.condition)  # unknown names fail here, before any model loads
    if cfg.validation_metric:
        get_metric(cfg.validation_metric)
    if cfg.consistency_loss_weight > 0:
        from zeroconv.train.consistency import check_consistency

        check_consistency(cfg)  # names and options; a depth or segmentation model loads in set-up
    examples = open_examples(cfg)
    check_output_dir(cfg.output_dir)
    check_optional_packages(cfg)
    if cfg.push_to_hub:
        check_push_possible(cfg.hub_model_id or Path(cfg.output_dir).resolve().name, cfg.hub_token)
    return Checked(pairs, examples)
