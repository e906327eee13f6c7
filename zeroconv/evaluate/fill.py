"""The Fill50K controllability metric: is the circle filled where the outline says, in the colors the prompt says?

- fill_iou: the generated image's pixels nearer the prompt's circle color than its background color, against
  the interior of the condition's outline (its closed curve filled in); intersection over union.
- circle_color_accuracy / background_color_accuracy: the image's two dominant colors, wherever they are, each
  named by the nearest color of the palette the prompt's colors come from (zeroconv.data.synth: the 16
  "distinct" colors when both prompt colors are among them, else all CSS colors), compared with the prompt.
  Position plays no part, so a base model without ControlNet can score well on color and badly on fill.

The background color is the median of the image's border; the circle's is the median of the pixels far from it.
"""

from __future__ import annotations

import cv2
import numpy as np

from zeroconv.data.synth import CSS_COLORS, DISTINCT_COLORS, parse_fill_prompt
from zeroconv.errors import UserError

# RGB distance from the background color beyond which a pixel counts as foreground when finding the circle.
FOREGROUND_DISTANCE = 60.0
# A circle smaller than this fraction of the image counts as absent (its color as wrong).
MIN_CIRCLE_FRACTION = 0.005
BORDER = 2


def outline_interior(condition: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean mask of the outline and everything it encloses (a 4-connected fill from outside cannot cross an
    8-connected curve), found at the condition's own resolution (resizing a thin outline would open gaps) and
    then resized to `size` (width, height)."""
    gray = condition if condition.ndim == 2 else condition[..., :3].max(axis=2)
    line = (gray >= 128).astype(np.uint8)
    padded = np.pad(line, 1)  # the flood starts in the frame, so it reaches every outside pixel
    mask = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(padded, mask, (0, 0), 2, flags=4)
    interior = (padded[1:-1, 1:-1] != 2).astype(np.float32)
    if size is not None and interior.shape[::-1] != tuple(size):
        interior = cv2.resize(interior, tuple(size), interpolation=cv2.INTER_AREA)
    return interior >= 0.5


def fill_iou(generated: np.ndarray, interior: np.ndarray, circle_rgb, background_rgb) -> float:
    pixels = generated[..., :3].astype(np.float32)
    to_circle = np.linalg.norm(pixels - np.float32(circle_rgb), axis=-1)
    to_background = np.linalg.norm(pixels - np.float32(background_rgb), axis=-1)
    filled = to_circle < to_background
    union = np.logical_or(filled, interior).sum()
    return float(np.logical_and(filled, interior).sum() / union) if union else 1.0


def dominant_colors(generated: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(circle RGB or None if there is no circle, background RGB) of a generated image."""
    pixels = generated[..., :3].astype(np.float32)
    frame = np.ones(pixels.shape[:2], bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    background = np.median(pixels[frame], axis=0)
    foreground = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    if foreground.mean() < MIN_CIRCLE_FRACTION:
        return None, background
    return np.median(pixels[foreground], axis=0), background


def palette_of(*names: str) -> np.ndarray:
    """The (N, 3) RGB palette the prompt's colors are judged against."""
    palette = DISTINCT_COLORS if all(n in DISTINCT_COLORS for n in names) else CSS_COLORS
    return np.array([CSS_COLORS[n] for n in palette], np.float32)


def names_color(rgb: np.ndarray | None, name: str, table: np.ndarray) -> bool:
    """Is `name` the palette color nearest to `rgb`? Compared by value: CSS has aliases (aqua is cyan)."""
    if rgb is None:
        return False
    nearest = table[int(np.argmin(np.linalg.norm(table - rgb, axis=1)))]
    return bool((nearest == np.float32(CSS_COLORS[name])).all())


def fill_metrics(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    """fill_iou, circle_color_accuracy and background_color_accuracy of one generated image (HxWx3 uint8)."""
    try:
        circle, background = parse_fill_prompt(prompt)
    except ValueError as exc:
        raise UserError(f"fill metric: {exc}") from None
    height, width = generated.shape[:2]
    interior = outline_interior(condition, (width, height))
    found_circle, found_background = dominant_colors(generated)
    table = palette_of(circle, background)
    return {
        "fill_iou": fill_iou(generated, interior, CSS_COLORS[circle], CSS_COLORS[background]),
        "circle_color_accuracy": float(names_color(found_circle, circle, table)),
        "background_color_accuracy": float(names_color(found_background, background, table)),
    }
