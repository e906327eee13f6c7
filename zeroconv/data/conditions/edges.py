"""Edge conditions, model-free: canny, scribble, soft edge (difference of Gaussians), lineart-lite (XDoG).

All draw white lines on black, as ControlNet's edge annotators do.
"""

from __future__ import annotations

import cv2
import numpy as np

from zeroconv.data.conditions import Extractor


def gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def to_rgb(single: np.ndarray) -> np.ndarray:
    return np.repeat(single[:, :, None], 3, axis=2)


def canny_edges(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    """HxW uint8: 255 on edges, 0 elsewhere."""
    return cv2.Canny(gray(rgb), low, high)


class Canny(Extractor):
    """Canny edges. Fixed thresholds, or with `random_thresholds` a fresh pair per image (ControlNet 1.1 trains its
    canny model that way so it follows both sparse and dense edge maps): low in [low_min, low_max], high in
    [low + 50, min(255, 3 * low)]."""

    def __init__(self, seed: int = 0, *, low: int = 100, high: int = 200, random_thresholds: bool = False,
                 low_min: int = 20, low_max: int = 150):
        super().__init__(seed)
        if not 0 <= low <= high:
            raise ValueError(f"thresholds need 0 <= low <= high, got low={low} high={high}")
        if random_thresholds and not 0 <= low_min <= low_max <= 205:
            raise ValueError(f"random thresholds need 0 <= low_min <= low_max <= 205, got {low_min}, {low_max}")
        self.low, self.high, self.random_thresholds = low, high, random_thresholds
        self.low_min, self.low_max = low_min, low_max

    def thresholds(self, rng: np.random.Generator) -> tuple[int, int]:
        if not self.random_thresholds:
            return self.low, self.high
        low = int(rng.integers(self.low_min, self.low_max + 1))
        high = int(rng.integers(low + 50, max(low + 50, min(255, 3 * low)) + 1))
        return low, high

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return to_rgb(canny_edges(rgb, *self.thresholds(rng)))


class Scribble(Extractor):
    """Edges of the smoothed image thickened morphologically to a random stroke width in [width_min, width_max]
    pixels: a stand-in for hand-drawn scribbles. Smoothing first keeps only the main contours."""

    def __init__(self, seed: int = 0, *, width_min: int = 2, width_max: int = 6, smoothing: float = 2.0,
                 low: int = 50, high: int = 150):
        super().__init__(seed)
        if not 1 <= width_min <= width_max:
            raise ValueError(f"stroke widths need 1 <= width_min <= width_max, got {width_min}, {width_max}")
        self.width_min, self.width_max, self.smoothing = width_min, width_max, smoothing
        self.low, self.high = low, high

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        width = int(rng.integers(self.width_min, self.width_max + 1))
        smooth = cv2.GaussianBlur(rgb, (0, 0), self.smoothing) if self.smoothing > 0 else rgb
        edges = canny_edges(smooth, self.low, self.high)
        if width > 1:
            edges = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
        return to_rgb(edges)


def gaussian_difference(rgb: np.ndarray, sigma: float, k: float, tau: float = 1.0) -> np.ndarray:
    """G_sigma - tau * G_{k sigma} of the gray image in [0, 1], float32."""
    g = gray(rgb).astype(np.float32) / 255.0
    return cv2.GaussianBlur(g, (0, 0), sigma) - tau * cv2.GaussianBlur(g, (0, 0), sigma * k)


class SoftEdge(Extractor):
    """Soft edges: the magnitude of a difference of Gaussians, scaled so its `percentile` maps to white. Lines keep
    their strength (grey levels), like HED/PiDiNet maps, without a model."""

    def __init__(self, seed: int = 0, *, sigma: float = 1.0, k: float = 1.6, percentile: float = 99.0):
        super().__init__(seed)
        if sigma <= 0 or k <= 1:
            raise ValueError(f"need sigma > 0 and k > 1, got sigma={sigma} k={k}")
        self.sigma, self.k, self.percentile = sigma, k, percentile

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        dog = np.abs(gaussian_difference(rgb, self.sigma, self.k))
        scale = max(float(np.percentile(dog, self.percentile)), 1e-3)
        return to_rgb(np.clip(dog / scale * 255.0, 0, 255).astype(np.uint8))


class Lineart(Extractor):
    """Lineart-lite: extended difference of Gaussians (XDoG, Winnemoeller 2012), a soft threshold that turns the
    sharpened image into clean ink lines; inverted so lines are white on black."""

    def __init__(self, seed: int = 0, *, sigma: float = 0.8, k: float = 1.6, tau: float = 0.98,
                 epsilon: float = -0.01, phi: float = 200.0):
        super().__init__(seed)
        if sigma <= 0 or k <= 1:
            raise ValueError(f"need sigma > 0 and k > 1, got sigma={sigma} k={k}")
        self.sigma, self.k, self.tau, self.epsilon, self.phi = sigma, k, tau, epsilon, phi

    def extract(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        d = gaussian_difference(rgb, self.sigma, self.k, self.tau)
        paper = np.where(d >= self.epsilon, 1.0, 1.0 + np.tanh(self.phi * (d - self.epsilon)))
        return to_rgb(np.clip((1.0 - paper) * 255.0, 0, 255).astype(np.uint8))
