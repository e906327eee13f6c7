"""Registry of controllability metrics, used by validation during training, `zeroconv eval` and the demo.

A metric is `fn(condition: np.ndarray HxWxC uint8, prompt: str, generated: np.ndarray HxWxC uint8) -> dict[str,
float]`: it re-reads the condition from the generated image (re-extraction, as in ControlNet++) or checks it
directly, and returns named scores. Means over a validation set are what the training curve shows.
Entries are "module:function" so no metric's imports load until it is used.
"""

from __future__ import annotations

import importlib

from zeroconv.errors import UserError

METRICS: dict[str, str] = {
    # name -> "module:function"; each module's author adds its line here.
    "fill": "zeroconv.evaluate.fill:fill_metrics",
    "canny": "zeroconv.evaluate.controllability:canny_f1",
    "scribble": "zeroconv.evaluate.controllability:scribble_f1",
    "softedge": "zeroconv.evaluate.controllability:softedge_ssim",
    "lineart": "zeroconv.evaluate.controllability:lineart_ssim",
    "grayscale": "zeroconv.evaluate.controllability:grayscale_similarity",
    "blur": "zeroconv.evaluate.controllability:blur_similarity",
    "palette": "zeroconv.evaluate.controllability:palette_similarity",
    "depth": "zeroconv.evaluate.controllability:depth_rmse",
    "segmentation": "zeroconv.evaluate.controllability:segmentation_miou",
}


def get_metric(name: str):
    if name not in METRICS:
        raise UserError(f"unknown metric '{name}'; available: {', '.join(sorted(METRICS)) or 'none'}")
    module_name, func_name = METRICS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)
