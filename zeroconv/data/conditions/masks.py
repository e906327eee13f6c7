"""Inpainting condition: random brush strokes and boxes (the mask recipe of LaMa / SD-inpainting training)."""

from __future__ import annotations

import cv2
import numpy as np

from zeroconv.data.conditions import Extractor

OUTPUTS = ("masked", "mask", "rgba")


def random_mask(height: int, width: int, rng: np.random.Generator, strokes_max: int, boxes_max: int,
                max_width_fraction: float, max_box_fraction: float) -> np.ndarray:
    """HxW uint8, 255 where the image is to be filled in: 1..strokes_max strokes, 0..boxes_max boxes."""
    mask = np.zeros((height, width), np.uint8)
    side = min(height, width)
    for _ in range(int(rng.integers(1, strokes_max + 1))):
        thickness = int(rng.integers(max(1, side // 40), max(2, int(side * max_width_fraction)) + 1))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        angle = float(rng.uniform(0, 2 * np.pi))
        for _ in range(int(rng.integers(2, 8))):
            angle += float(rng.uniform(-np.pi / 3, np.pi / 3))
            length = float(rng.uniform(0.05, 0.25)) * side
            nx = float(np.clip(x + length * np.cos(angle), 0, width - 1))
            ny = float(np.clip(y + length * np.sin(angle), 0, height - 1))
            cv2.line(mask, (round(x), round(y)), (round(nx), round(ny)), 255, thickness)
            x, y = nx, ny
    for _ in range(int(rng.integers(0, boxes_max + 1))):
        bw = int(rng.integers(max(1, side // 10), max(2, int(width * max_box_fraction)) + 1))
        bh = int(rng.integers(max(1, side // 10), max(2, int(height * max_box_fraction)) + 1))
        x0, y0 = int(rng.integers(0, max(1, width - bw + 1))), int(rng.integers(0, max(1, height - bh + 1)))
        mask[y0:y0 + bh, x0:x0 + bw] = 255
    return mask


class InpaintMask(Extractor):
    """A random mask per image. `output`: 'masked' (the image with the hole painted `fill`, what the ControlNet sees
    of the known pixels), 'mask' (white hole on black) or 'rgba' (the masked image plus the mask as alpha; train
    with --conditioning_channels 4)."""

    def __init__(self, seed: int = 0, *, output: str = "masked", fill: int = 0, strokes_max: int = 4,
                 boxes_max: int = 2, max_width_fraction: float = 0.1, max_box_fraction: float = 0.5):
        super().__init__(seed)
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: use one of {', '.join(OUTPUTS)}")
        if strokes_max < 1 or boxes_max < 0:
            raise ValueError(f"need strokes_max >= 1 and boxes_max >= 0, got {strokes_max}, {boxes_max}")
        self.output, self.fill = output, fill
        self.strokes_max, self.boxes_max = strokes_max, boxes_max
        self.max_width_fraction, self.max_box_fraction = max_width_fraction, max_box_fraction

    def mask(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        return random_mask(height, width, rng, self.strokes_max, self.boxes_max, self.max_width_fraction,
                           self.max_box_fraction)

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mask = self.mask(*rgb.shape[:2], rng)
        if self.output == "mask":
            return np.repeat(mask[:, :, None], 3, axis=2)
        masked = rgb.copy()
        masked[mask > 0] = self.fill
        if self.output == "rgba":
            return np.concatenate([masked, mask[:, :, None]], axis=2)
        return masked
