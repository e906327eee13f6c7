"""Face landmarks drawn as an illustrated mask, from 68-point iBUG annotations (the seed blog's condition).

Annotations are read, not detected: FaceSynthetics ships `000123_ldmks.txt` beside `000123.png`, one "x y" line per
point in image pixels, the 68 iBUG points (then two pupils, ignored). Landmarks from any detector (SPIGA, dlib,
face-alignment) saved in that layout work the same. Each region is drawn in its own color, lines first and the
points on top, so the pixel at every annotated point carries its region's color.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from zeroconv.data.conditions import BadInput, Extractor

# iBUG 68-point layout: region -> (point index ranges, closed contour?)
REGIONS: dict[str, list[tuple[range, bool]]] = {
    "jaw": [(range(0, 17), False)],
    "brows": [(range(17, 22), False), (range(22, 27), False)],
    "nose": [(range(27, 31), False), (range(30, 36), False)],
    "eyes": [(range(36, 42), True), (range(42, 48), True)],
    "lips": [(range(48, 60), True), (range(60, 68), True)],
}

COLORS: dict[str, tuple[int, int, int]] = {
    "jaw": (255, 255, 255),
    "brows": (255, 140, 0),
    "nose": (0, 220, 0),
    "eyes": (0, 120, 255),
    "lips": (255, 0, 160),
}

NUM_POINTS = 68


def region_of(index: int) -> str:
    for region, parts in REGIONS.items():
        if any(index in indices for indices, _ in parts):
            return region
    raise IndexError(index)


def read_landmarks(path: Path) -> np.ndarray:
    """68x2 float array (x, y) from a FaceSynthetics-style file; BadInput if missing or malformed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BadInput(f"no landmark annotation {path.name}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"unreadable landmark annotation {path.name} ({type(exc).__name__})") from None
    try:
        rows = [[float(v) for v in line.split()] for line in text.splitlines() if line.strip()]
        points = np.array(rows[:NUM_POINTS], np.float64)
    except ValueError:
        raise BadInput(f"unreadable landmark annotation {path.name} (expected 'x y' numbers per line)") from None
    if points.shape != (NUM_POINTS, 2) or not np.isfinite(points).all():
        raise BadInput(f"unreadable landmark annotation {path.name} (expected {NUM_POINTS} lines of 'x y', "
                       f"got {len(rows)})")
    return points


def stored_size(image_path: Path) -> tuple[int, int]:
    """(width, height) the annotation's coordinates refer to: the file's pixels, EXIF rotation applied."""
    with Image.open(image_path) as im:
        width, height = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap the axes
            width, height = height, width
    return width, height


def draw_landmarks(points: np.ndarray, width: int, height: int, thickness: int = 0) -> np.ndarray:
    """The illustrated mask (HxWx3 uint8, black background) of 68 points already in (width, height) pixels."""
    thickness = thickness or max(1, round(min(width, height) / 256))
    canvas = np.zeros((height, width, 3), np.uint8)
    fixed = np.round(points).astype(np.int32)
    for region, parts in REGIONS.items():
        for indices, closed in parts:
            cv2.polylines(canvas, [fixed[list(indices)]], closed, COLORS[region], thickness, cv2.LINE_8)
    for index, (x, y) in enumerate(fixed):
        cv2.circle(canvas, (int(x), int(y)), thickness + 1, COLORS[region_of(index)], -1, cv2.LINE_8)
    return canvas


class FaceLandmarks(Extractor):
    """68-point landmarks from the annotation beside each image (`<stem><suffix>`, or in `annotations_dir`) drawn
    as an illustrated mask. Needs the image path: `extractor(image, rng, path=image_path)`."""

    needs_path = True

    def __init__(self, seed: int = 0, *, suffix: str = "_ldmks.txt", annotations_dir: str = "", thickness: int = 0):
        super().__init__(seed)
        self.suffix, self.annotations_dir, self.thickness = suffix, annotations_dir, thickness

    def annotation_path(self, image_path: Path) -> Path:
        folder = Path(self.annotations_dir) if self.annotations_dir else image_path.parent
        return folder / f"{image_path.stem}{self.suffix}"

    def extract(self, rgb: np.ndarray, rng: np.random.Generator, path: Path) -> np.ndarray:
        points = read_landmarks(self.annotation_path(path))
        height, width = rgb.shape[:2]
        source_width, source_height = stored_size(path)
        scaled = points * np.array([width / source_width, height / source_height])
        return draw_landmarks(scaled, width, height, self.thickness)
