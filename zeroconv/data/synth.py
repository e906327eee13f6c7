"""Synthetic datasets: Fill50K-compatible circles, and captioned shapes to pretrain the toy base.

`zeroconv synth fill OUT` writes lllyasviel's Fill50K layout: prompt.json (one JSON object a line: source,
target, prompt), source/N.png (a white circle outline on black) and target/N.png (the circle filled with one
color on a background of another), prompted "<color> circle with <color> background" with CSS color names
spelled in words as Fill50K spells them ("burly wood circle with orange background").

`zeroconv synth shapes OUT` writes captioned images of one colored shape (circle, square, triangle, diamond) at a
random size and place: what the toy base learns colors and shapes from, without ever seeing an outline.

Example i is drawn from its own generator seeded by (seed, i), so the output depends on the seed alone, not on
the number of processes or on chunking; processes write the PNGs in parallel, the parent writes the index.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from PIL import ImageColor

from zeroconv.config import option, parse
from zeroconv.errors import UserError

# The words CSS color names are made of; `color_words` splits "lightgoldenrodyellow" into "light golden rod yellow"
# with them, as Fill50K's prompts do.
CSS_WORDS = """alice antique white aqua aquamarine azure beige bisque black blanched almond blue violet brown burly
wood cadet chartreuse chocolate coral cornflower cornsilk crimson cyan dark golden rod gray grey green khaki magenta
olive orange orchid red salmon sea slate turquoise deep pink sky dim dodger fire brick floral forest fuchsia gainsboro
ghost gold honeydew hot indian indigo ivory lavender blush lawn lemon chiffon light yellow steel lime linen maroon
medium purple spring mint cream misty rose moccasin navajo navy old lace drab pale papaya whip peach puff peru plum
powder rebecca rosy royal saddle sandy shell sienna silver snow tan teal thistle tomato wheat smoke midnight""".split()


def color_words(css_name: str) -> str:
    """'burlywood' -> 'burly wood': the fewest known words that spell the CSS name."""
    best: list[list[str] | None] = [[]] + [None] * len(css_name)
    for end in range(1, len(css_name) + 1):
        for start in range(end):
            word = css_name[start:end]
            if best[start] is not None and word in CSS_WORDS:
                candidate = best[start] + [word]
                if best[end] is None or len(candidate) < len(best[end]):
                    best[end] = candidate
    if best[-1] is None:
        raise ValueError(f"CSS color name {css_name!r} is not made of known words")
    return " ".join(best[-1])


# All 148 CSS named colors, "burly wood" -> (222, 184, 135). grey/gray spellings are one color: keep gray.
# getrgb, not the colormap's values: PIL replaces a name's hex string there by its tuple once any code has used the
# name (Image.new("RGB", size, "white") in validation grids), so the values depend on what ran before this import.
CSS_COLORS: dict[str, tuple[int, int, int]] = {
    color_words(name): ImageColor.getrgb(name)[:3] for name in sorted(ImageColor.colormap) if "grey" not in name
}

# Sixteen CSS colors far apart in RGB (every pair at least 109 apart): small models tell them apart reliably,
# so the demo measures control, not color vision. Multi-word names are kept so prompts read like Fill50K's.
DISTINCT_COLORS: tuple[str, ...] = (
    "red", "lime", "blue", "yellow", "aqua", "fuchsia", "white", "black", "gray", "purple", "navy", "teal",
    "tomato", "violet", "burly wood", "royal blue",
)

PALETTES: dict[str, tuple[str, ...]] = {"css": tuple(CSS_COLORS), "distinct": DISTINCT_COLORS}

SHAPES = ("circle", "square", "triangle", "diamond")

# Below this RGB distance a filled circle is hard to see on its background; such pairs are never drawn.
MIN_CONTRAST = 100.0

FILL_PROMPT = re.compile(r"^\s*(?:an? )?(?P<circle>[a-z ]+?) circle (?:with|on|in) (?:an? )?(?P<background>[a-z ]+?) "
                         r"background\.?\s*$")


def parse_fill_prompt(prompt: str) -> tuple[str, str]:
    """'burly wood circle with orange background' -> ('burly wood', 'orange'); ValueError if not that form."""
    match = FILL_PROMPT.match(prompt.lower())
    if not match:
        raise ValueError(f"prompt {prompt!r} is not '<color> circle with <color> background'")
    names = match.group("circle"), match.group("background")
    for name in names:
        if name not in CSS_COLORS:
            raise ValueError(f"prompt {prompt!r}: '{name}' is not a CSS color name")
    return names


def pick_colors(rng: np.random.Generator, palette: tuple[str, ...], count: int) -> list[str]:
    """`count` palette names, every pair at least MIN_CONTRAST apart."""
    while True:
        names = [palette[i] for i in rng.choice(len(palette), size=count, replace=False)]
        rgbs = np.array([CSS_COLORS[n] for n in names], dtype=np.float64)
        distances = np.linalg.norm(rgbs[:, None] - rgbs[None], axis=-1)[np.triu_indices(count, 1)]
        if (distances >= MIN_CONTRAST).all():
            return names


def outline_thickness(resolution: int) -> int:
    return max(1, round(resolution / 100))


@dataclass
class FillExample:
    source: np.ndarray  # HxWx3 uint8, white outline on black
    target: np.ndarray  # HxWx3 uint8, filled circle on a background
    prompt: str


def fill_example(seed: int, index: int, resolution: int = 512, palette: str = "css") -> FillExample:
    """Example `index` of the Fill set drawn with `seed`: the same arguments give the same pixels."""
    rng = np.random.default_rng([seed, index])
    circle, background = pick_colors(rng, PALETTES[palette], 2)
    radius = int(rng.integers(round(0.12 * resolution), round(0.4 * resolution) + 1))
    margin = radius + outline_thickness(resolution)
    center = tuple(int(c) for c in rng.integers(margin, resolution - margin + 1, size=2))
    target = np.empty((resolution, resolution, 3), np.uint8)
    target[:] = CSS_COLORS[background]
    cv2.circle(target, center, radius, CSS_COLORS[circle], thickness=-1, lineType=cv2.LINE_AA)
    source = np.zeros((resolution, resolution, 3), np.uint8)
    # 8-connected and not antialiased: the outline is closed, so its interior is recoverable by a 4-connected fill
    cv2.circle(source, center, radius, (255, 255, 255), thickness=outline_thickness(resolution), lineType=cv2.LINE_8)
    return FillExample(source, target, f"{circle} circle with {background} background")


def draw_shape(image: np.ndarray, shape: str, center: tuple[int, int], size: int, color, angle: float = 0.0) -> None:
    """Fill `shape` of half-width `size` at `center` into `image`, antialiased."""
    if shape == "circle":
        cv2.circle(image, center, size, color, thickness=-1, lineType=cv2.LINE_AA)
        return
    corners = {"square": 4, "triangle": 3, "diamond": 4}[shape]
    start = {"square": np.pi / 4, "triangle": -np.pi / 2, "diamond": 0.0}[shape] + angle
    theta = start + 2 * np.pi * np.arange(corners) / corners
    radius = size * (np.sqrt(2) if shape == "square" else 1.2 if shape == "triangle" else 1.1)
    points = np.stack([center[0] + radius * np.cos(theta), center[1] + radius * np.sin(theta)], axis=1)
    cv2.fillPoly(image, [np.round(points * 16).astype(np.int32)], color, lineType=cv2.LINE_AA, shift=4)


def shapes_example(seed: int, index: int, resolution: int = 64, palette: str = "distinct",
                   circle_fraction: float = 0.5) -> tuple[np.ndarray, str]:
    """A captioned image of one colored shape: ('<color> <shape> with <color> background')."""
    rng = np.random.default_rng([seed, index])
    color, background = pick_colors(rng, PALETTES[palette], 2)
    shape = "circle" if rng.random() < circle_fraction else str(rng.choice(SHAPES[1:]))
    size = int(rng.integers(round(0.12 * resolution), round(0.4 * resolution) + 1))
    margin = size if shape == "circle" else int(size * 1.2)
    margin = min(margin, resolution // 2 - 1)
    center = tuple(int(c) for c in rng.integers(margin, resolution - margin + 1, size=2))
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = CSS_COLORS[background]
    draw_shape(image, shape, center, size, CSS_COLORS[color], angle=float(rng.uniform(-0.3, 0.3)))
    return image, f"{color} {shape} with {background} background"


# ---------------------------------------------------------------------------------------------------------------
# Writing datasets
# ---------------------------------------------------------------------------------------------------------------

def _write_png(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_fill_one(index: int, out: Path, seed: int, resolution: int, palette: str) -> dict:
    example = fill_example(seed, index, resolution, palette)
    _write_png(out / "source" / f"{index}.png", example.source)
    _write_png(out / "target" / f"{index}.png", example.target)
    return {"source": f"source/{index}.png", "target": f"target/{index}.png", "prompt": example.prompt}


def _write_shapes_one(index: int, out: Path, seed: int, resolution: int, palette: str) -> dict:
    image, caption = shapes_example(seed, index, resolution, palette)
    _write_png(out / f"{index}.png", image)
    return {"file_name": f"{index}.png", "text": caption}


def _run_parallel(fn, n: int, workers: int, desc: str, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    chunk = max(1, min(256, n // (workers * 8) or 1))
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1:
            rows = []
            for i in range(n):
                rows.append(fn(i))
                bar.update(1)
            return rows
        from concurrent.futures import ProcessPoolExecutor

        rows = []
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for row in pool.map(fn, range(n), chunksize=chunk):
                rows.append(row)
                bar.update(1)
        return rows


def _check_out(out: Path, index_name: str, overwrite: bool) -> None:
    if (out / index_name).exists() and not overwrite:
        raise UserError(f"{out}: already holds a dataset ({index_name}); pass --overwrite or pick another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the output folder ({exc.strerror})") from None


def _check_args(n: int, resolution: int, palette: str, workers: int | None) -> int:
    if n < 1:
        raise UserError(f"--n {n}: must be at least 1")
    if resolution < 16:
        raise UserError(f"--resolution {resolution}: must be at least 16 pixels")
    if palette not in PALETTES:
        raise UserError(f"--palette {palette}: unknown; use one of {', '.join(PALETTES)}")
    return max(1, workers if workers else (os.cpu_count() or 1))


def write_fill(out: str | Path, n: int, resolution: int = 512, seed: int = 0, palette: str = "css",
               workers: int | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a Fill50K-layout dataset of `n` examples to `out`; returns `out`."""
    out = Path(out)
    workers = _check_args(n, resolution, palette, workers)
    _check_out(out, "prompt.json", overwrite)
    (out / "source").mkdir(exist_ok=True)
    (out / "target").mkdir(exist_ok=True)
    fn = partial(_write_fill_one, out=out, seed=seed, resolution=resolution, palette=palette)
    rows = _run_parallel(fn, n, workers, "synth fill", progress)
    with open(out / "prompt.json", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return out


def write_shapes(out: str | Path, n: int, resolution: int = 64, seed: int = 0, palette: str = "distinct",
                 workers: int | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write `n` captioned shape images as an imagefolder (metadata.jsonl: file_name, text); returns `out`."""
    out = Path(out)
    workers = _check_args(n, resolution, palette, workers)
    _check_out(out, "metadata.jsonl", overwrite)
    fn = partial(_write_shapes_one, out=out, seed=seed, resolution=resolution, palette=palette)
    rows = _run_parallel(fn, n, workers, "synth shapes", progress)
    with open(out / "metadata.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return out


@dataclass
class SynthConfig:
    kind: str = option("fill", "What to write: 'fill' (Fill50K layout: prompt.json, source/, target/) or 'shapes' "
                       "(captioned colored shapes, imagefolder with metadata.jsonl).", choices=["fill", "shapes"])
    out: str = option(None, "Output folder.")
    n: int = option(50000, "Number of examples.")
    resolution: int = option(512, "Image side in pixels.")
    seed: int = option(0, "Seed: the same seed writes the same images, whatever the number of processes.")
    palette: str = option("css", "Colors to draw from: 'css' (all CSS named colors, as Fill50K) or 'distinct' (16 "
                          "well-separated CSS colors, what the toy base knows).", choices=list(PALETTES))
    workers: int = option(0, "Processes writing images; 0 uses every CPU core.")
    overwrite: bool = option(False, "Write into a folder that already holds a dataset.")


def main(argv: list[str] | None = None) -> int:
    cfg = parse(SynthConfig, argv, prog="zeroconv synth", positional=("kind", "out"),
                description="Write a synthetic dataset: Fill50K-compatible circles (fill) or captioned shapes.")
    write = write_fill if cfg.kind == "fill" else write_shapes
    start = time.perf_counter()
    write(cfg.out, cfg.n, cfg.resolution, cfg.seed, cfg.palette, cfg.workers or None, cfg.overwrite)
    elapsed = time.perf_counter() - start
    print(f"wrote {cfg.n} {cfg.kind} examples ({cfg.resolution} px) to {cfg.out} in {elapsed:.1f} s "
          f"({cfg.n / elapsed:.0f} images/s)")
    return 0
