"""Small synthetic photos with clear structure (shapes on a gradient), and a plausible 68-point face layout."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def photo(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(40, 200, 3)
    image = np.clip(base + 50 * x - 30 * y + np.zeros((height, width, 3)), 0, 255).astype(np.uint8)
    for _ in range(3):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        center = (int(rng.integers(width // 4, 3 * width // 4)), int(rng.integers(height // 4, 3 * height // 4)))
        size = int(rng.integers(max(3, min(width, height) // 8), max(4, min(width, height) // 3)))
        if rng.random() < 0.5:
            cv2.circle(image, center, size, color, -1)
        else:
            cv2.rectangle(image, (center[0] - size, center[1] - size), (center[0] + size, center[1] + size), color, -1)
    return Image.fromarray(image)


def square(size: int = 64, inner: int = 32) -> Image.Image:
    """A white square centered on black: edges exactly on its border."""
    image = np.zeros((size, size, 3), np.uint8)
    start = (size - inner) // 2
    image[start:start + inner, start:start + inner] = 255
    return Image.fromarray(image)


def face_landmarks(size: int = 256) -> np.ndarray:
    """68x2 iBUG points of a frontal face filling a `size` image (regions well apart, like a real face)."""
    s = size / 256
    t = np.linspace(np.pi * 0.05, np.pi * 0.95, 17)
    jaw = np.stack([128 - 100 * np.cos(t), 110 + 120 * np.sin(t)], 1)
    brow_r = np.stack([np.linspace(60, 110, 5), [88, 80, 78, 80, 86]], 1)
    brow_l = np.stack([np.linspace(146, 196, 5), [86, 80, 78, 80, 88]], 1)
    bridge = np.stack([[128] * 4, np.linspace(100, 145, 4)], 1)
    nostrils = np.stack([np.linspace(108, 148, 5), [158, 162, 164, 162, 158]], 1)
    a = np.linspace(0, 2 * np.pi, 7)[:-1]
    eye_r = np.stack([85 + 16 * np.cos(a + np.pi), 108 + 7 * np.sin(a + np.pi)], 1)
    eye_l = np.stack([171 + 16 * np.cos(a + np.pi), 108 + 7 * np.sin(a + np.pi)], 1)
    b = np.linspace(0, 2 * np.pi, 13)[:-1]
    outer = np.stack([128 + 34 * np.cos(b + np.pi), 192 + 14 * np.sin(b + np.pi)], 1)
    c = np.linspace(0, 2 * np.pi, 9)[:-1]
    inner = np.stack([128 + 20 * np.cos(c + np.pi), 192 + 5 * np.sin(c + np.pi)], 1)
    points = np.concatenate([jaw, brow_r, brow_l, bridge, nostrils, eye_r, eye_l, outer, inner])
    assert points.shape == (68, 2)
    return points * s


def write_ldmks(path, points: np.ndarray, pupils: bool = True) -> None:
    """FaceSynthetics layout: one 'x y' line per point, 68 iBUG points then two pupils."""
    rows = list(points)
    if pupils:
        rows += [points[36:42].mean(0), points[42:48].mean(0)]
    path.write_text("".join(f"{x:.3f} {y:.3f}\n" for x, y in rows))
