"""Color conditions: pixelated palette, grayscale (colorization), blur (tile / deblur)."""

from __future__ import annotations

import cv2
import numpy as np

from zeroconv.data.conditions import Extractor


class Palette(Extractor):
    """The community's pixelated color palette: the image averaged down to `cells` blocks across its longer side,
    optionally quantized to `colors` colors, and blown back up with hard block edges."""

    def __init__(self, seed: int = 0, *, cells: int = 16, colors: int = 0):
        super().__init__(seed)
        if cells < 1 or colors < 0:
            raise ValueError(f"need cells >= 1 and colors >= 0, got cells={cells} colors={colors}")
        self.cells, self.colors = cells, colors

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = rgb.shape[:2]
        scale = self.cells / max(h, w)
        small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        if self.colors:
            from PIL import Image

            small = np.asarray(Image.fromarray(small).quantize(self.colors, method=Image.Quantize.MEDIANCUT)
                               .convert("RGB"))
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


class Grayscale(Extractor):
    """Luma as three equal channels: the condition of a colorization ControlNet."""

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)


class Blur(Extractor):
    """Gaussian blur of strength `sigma` (pixels), or with `sigma_max` > sigma a random strength in [sigma,
    sigma_max] per image: the condition of tile / deblur ControlNets."""

    def __init__(self, seed: int = 0, *, sigma: float = 4.0, sigma_max: float = 0.0):
        super().__init__(seed)
        if sigma <= 0 or (sigma_max and sigma_max < sigma):
            raise ValueError(f"need sigma > 0 and sigma_max 0 (fixed) or >= sigma, got {sigma}, {sigma_max}")
        self.sigma, self.sigma_max = sigma, sigma_max

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = float(rng.uniform(self.sigma, self.sigma_max)) if self.sigma_max > self.sigma else self.sigma
        return cv2.GaussianBlur(rgb, (0, 0), sigma)
