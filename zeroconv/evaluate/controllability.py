"""Re-extraction metrics (as in ControlNet++): extract the condition again from the generated image with the
extractor that made it, and compare with the condition the model was given.

    canny, scribble       edge F1 (with a pixel tolerance; scribble's tolerance follows its stroke width)
    softedge, lineart     SSIM of the edge maps
    depth                 RMSE of the depth maps, both scaled to [0, 1]
    grayscale, blur,      PSNR (dB) and SSIM of the re-extracted condition against the given one
    palette
    segmentation          mIoU over the classes in either map (classes read back from the fixed class colors)

Each is `fn(condition, prompt, generated) -> dict[str, float]` with HxWxC uint8 arrays; a generated image of
another size is resized to the condition's. Depth and segmentation need their model: the extractor's default
hub id, or the one set with `set_metric_model("depth", path_or_id)`.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from zeroconv.data.conditions import get_extractor

_metric_models: dict[str, str] = {}
_extractors: dict[tuple, object] = {}


def set_metric_model(condition: str, model: str) -> None:
    """Use `model` (local folder or hub id) to re-extract `condition` ('depth' or 'segmentation')."""
    _metric_models[condition] = model
    _extractors.pop((condition,), None)


def extractor(name: str, **options):
    key = (name, *sorted(options.items())) if options else (name,)
    if key not in _extractors:
        if name in ("depth", "segmentation") and name in _metric_models:
            options = {**options, "model": _metric_models[name]}
        _extractors[key] = get_extractor(name, seed=0, **options)
    return _extractors[key]


def re_extract(name: str, generated: np.ndarray, shape: tuple[int, ...], **options) -> np.ndarray:
    """The condition `name` extracted from `generated` at the condition's size, HxWx3 uint8."""
    image = Image.fromarray(np.ascontiguousarray(generated[..., :3]))
    if image.size != (shape[1], shape[0]):
        image = image.resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(extractor(name, **options)(image, rng=np.random.default_rng(0)))


def gray(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return array
    if array.shape[2] == 1:
        return array[:, :, 0]
    return cv2.cvtColor(np.ascontiguousarray(array[:, :, :3]), cv2.COLOR_RGB2GRAY)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two gray uint8 images (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z):
        return cv2.GaussianBlur(z, (11, 11), 1.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(value.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def edge_scores(expected: np.ndarray, found: np.ndarray, precision_tolerance: int, recall_tolerance: int) -> dict:
    """Precision: found edge pixels within `precision_tolerance` px of an expected edge; recall the converse."""

    def near(mask, radius):
        if radius <= 0:
            return mask
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        return cv2.dilate(mask.astype(np.uint8), kernel) > 0

    if not expected.any() and not found.any():
        return {"edge_f1": 1.0, "edge_precision": 1.0, "edge_recall": 1.0}
    precision = float((found & near(expected, precision_tolerance)).sum() / max(found.sum(), 1))
    recall = float((expected & near(found, recall_tolerance)).sum() / max(expected.sum(), 1))
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"edge_f1": f1, "edge_precision": precision, "edge_recall": recall}


def canny_f1(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    found = gray(re_extract("canny", generated, condition.shape)) > 127
    return edge_scores(gray(condition) > 127, found, 1, 1)


def scribble_f1(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    # One-pixel contours of the generation against thick strokes: a contour inside a stroke counts, and a stroke
    # counts as found if a contour runs within its widest half-width.
    found = gray(re_extract("scribble", generated, condition.shape, width_min=1, width_max=1)) > 127
    return edge_scores(gray(condition) > 127, found, 1, 4)


def softedge_ssim(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    return {"ssim": ssim(gray(condition), gray(re_extract("softedge", generated, condition.shape)))}


def lineart_ssim(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    return {"ssim": ssim(gray(condition), gray(re_extract("lineart", generated, condition.shape)))}


def _similarity(name: str, condition: np.ndarray, generated: np.ndarray) -> dict[str, float]:
    again = re_extract(name, generated, condition.shape)
    return {"psnr": psnr(condition[..., :3], again), "ssim": ssim(gray(condition), gray(again))}


def grayscale_similarity(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    return _similarity("grayscale", condition, generated)


def blur_similarity(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    return _similarity("blur", condition, generated)


def palette_similarity(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    return _similarity("palette", condition, generated)


def depth_rmse(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    expected = gray(condition).astype(np.float64) / 255.0
    found = gray(re_extract("depth", generated, condition.shape)).astype(np.float64) / 255.0
    return {"depth_rmse": float(np.sqrt(np.mean((expected - found) ** 2)))}


def class_ids(colors: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """HxW class ids of a segmentation drawn with `palette`: each pixel's nearest palette color."""
    flat = colors[..., :3].reshape(-1, 1, 3).astype(np.int32)
    distances = np.abs(flat - palette[None].astype(np.int32)).sum(-1)
    return distances.argmin(1).reshape(colors.shape[:2])


def segmentation_miou(condition: np.ndarray, prompt: str, generated: np.ndarray) -> dict[str, float]:
    from zeroconv.data.conditions.models import class_palette

    segmenter = extractor("segmentation")
    palette = class_palette(segmenter.num_classes())
    expected = class_ids(condition, palette)
    found = class_ids(re_extract("segmentation", generated, condition.shape), palette)
    ious = []
    for cls in np.union1d(np.unique(expected), np.unique(found)):
        a, b = expected == cls, found == cls
        ious.append((a & b).sum() / (a | b).sum())
    return {"miou": float(np.mean(ious)), "pixel_accuracy": float((expected == found).mean())}
