"""Conditions computed by a model through a transformers pipeline: depth and semantic segmentation.

`model` is a local folder (config + weights + image processor) or a hub id. The pipeline is built on first use,
in the process that uses it, so an extractor can be handed to worker processes without its weights.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from zeroconv.data.conditions import Extractor


def pick_device(device: str) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class PipelineExtractor(Extractor):
    task = ""
    default_model = ""

    def __init__(self, seed: int = 0, *, model: str = "", device: str = ""):
        super().__init__(seed)
        self.model = model or self.default_model
        self.device = device
        self._pipeline = None

    def __getstate__(self):
        return {**self.__dict__, "_pipeline": None}  # workers build their own

    @property
    def pipeline(self):
        if self._pipeline is None:
            from transformers import pipeline

            from zeroconv.errors import UserError

            try:
                self._pipeline = pipeline(self.task, model=self.model, device=pick_device(self.device))
            except OSError as exc:
                raise UserError(f"model {self.model}: cannot load it for {self.task} ({str(exc).splitlines()[0]}); "
                                "pass a local folder or a hub id with --condition_options model=...") from None
        return self._pipeline


class Depth(PipelineExtractor):
    """Relative depth, near = white, scaled to the full 0..255 range per image (as ControlNet's depth maps)."""

    task = "depth-estimation"
    default_model = "Intel/dpt-hybrid-midas"

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        import torch

        with torch.no_grad():
            predicted = self.pipeline(Image.fromarray(rgb))["predicted_depth"]
        depth = predicted.float().cpu().numpy().reshape(rgb.shape[:2])
        span = float(depth.max() - depth.min())
        scaled = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
        return np.repeat((scaled * 255.0).round().astype(np.uint8)[:, :, None], 3, axis=2)


def class_palette(num_classes: int) -> np.ndarray:
    """A fixed RGB color per class id (num_classes x 3 uint8), the same in every run and every process; class 0
    is black. Colors come from a fixed seed and are kept distinct (no two within 48 of each other per channel sum)."""
    rng = np.random.default_rng(20230210)
    colors = [np.zeros(3, np.int64)]
    while len(colors) < num_classes:
        candidate = rng.integers(0, 256, 3)
        if len(colors) > 1000 or min(np.abs(candidate - c).sum() for c in colors) >= 48:
            colors.append(candidate)
    return np.array(colors[:num_classes], np.uint8)


class Segmentation(PipelineExtractor):
    """Semantic segmentation drawn with a fixed color per class (`class_palette`), ADE20K classes by default."""

    task = "image-segmentation"
    default_model = "nvidia/segformer-b0-finetuned-ade-512-512"

    def class_map(self, rgb: np.ndarray) -> np.ndarray:
        """HxW int32 class ids."""
        import torch

        with torch.no_grad():
            segments = self.pipeline(Image.fromarray(rgb), subtask="semantic")
        label2id = {label: int(i) for i, label in self.pipeline.model.config.id2label.items()}
        ids = np.zeros(rgb.shape[:2], np.int32)
        for segment in segments:
            ids[np.asarray(segment["mask"]) > 0] = label2id[segment["label"]]
        return ids

    def num_classes(self) -> int:
        return len(self.pipeline.model.config.id2label)

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return class_palette(self.num_classes())[self.class_map(rgb)]
