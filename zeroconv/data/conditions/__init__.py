"""Condition extractors: an ordinary image in, the conditioning image out. One registry serves three users:
`zeroconv prepare` (a folder of photos -> dataset), `zeroconv train --condition NAME` (conditions computed on the
fly) and evaluation (the condition re-extracted from a generated image).

    extractor = get_extractor("canny", seed=0, low=100, high=200)
    condition = extractor(image, rng=np.random.default_rng([seed, index]))   # PIL in, PIL out, same size

Randomized extractors (canny with random thresholds, scribble width, inpainting masks, blur strength) draw only
from `rng`, so a condition is fixed by its generator. Without `rng` they draw from one generator seeded by `seed`
at construction: deterministic in call order only, so callers that may reorder (data-loader workers) pass `rng`.

Extractors that need more than the pixels say so with `needs_path = True` and are called with
`extractor(image, rng, path=IMAGE_PATH)`: the face-landmark extractor reads the annotation file lying beside the
image (FaceSynthetics' `000123.png` + `000123_ldmks.txt`) and scales its coordinates from the file's stored size
to the size of `image`, so the image may be resized before extraction.

A problem with the input itself (a missing or unreadable annotation) raises `BadInput(reason)`: `prepare` skips
that file and lists the reason in its report.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np
from PIL import Image

from zeroconv.errors import UserError

# name -> "module:class". Modules load only when their extractor is asked for (model-based ones import torch).
EXTRACTORS: dict[str, str] = {
    "canny": "zeroconv.data.conditions.edges:Canny",
    "scribble": "zeroconv.data.conditions.edges:Scribble",
    "softedge": "zeroconv.data.conditions.edges:SoftEdge",
    "lineart": "zeroconv.data.conditions.edges:Lineart",
    "palette": "zeroconv.data.conditions.color:Palette",
    "grayscale": "zeroconv.data.conditions.color:Grayscale",
    "blur": "zeroconv.data.conditions.color:Blur",
    "inpaint": "zeroconv.data.conditions.masks:InpaintMask",
    "landmarks": "zeroconv.data.conditions.landmarks:FaceLandmarks",
    "depth": "zeroconv.data.conditions.models:Depth",
    "segmentation": "zeroconv.data.conditions.models:Segmentation",
}


class BadInput(Exception):
    """The input cannot give a condition (e.g. its annotation file is unreadable); the message is the reason."""


class Extractor:
    """Base of all extractors: subclasses implement `extract(rgb, rng) -> HxWxC uint8` on an HxWx3 uint8 array."""

    needs_path = False

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None,
                 path: str | Path | None = None) -> Image.Image:
        rgb = np.asarray(image.convert("RGB"))
        rng = self.rng if rng is None else rng
        if self.needs_path:
            if path is None:
                raise ValueError(f"the {type(self).__name__} condition needs the image's path (path=...): it reads "
                                 "an annotation file beside the image")
            return Image.fromarray(self.extract(rgb, rng, Path(path)))
        return Image.fromarray(self.extract(rgb, rng))

    def extract(self, rgb: np.ndarray, rng: np.random.Generator, *args) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def extractor_class(name: str) -> type[Extractor]:
    if name not in EXTRACTORS:
        import difflib

        close = difflib.get_close_matches(name, EXTRACTORS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"--condition {name}: unknown condition{hint}; available: {', '.join(EXTRACTORS)}")
    module_name, class_name = EXTRACTORS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def extractor_options(name: str) -> dict:
    """The options `get_extractor(name, ...)` accepts, with their defaults."""
    params = inspect.signature(extractor_class(name).__init__).parameters
    return {key: p.default for key, p in params.items()
            if key != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def get_extractor(name: str, seed: int = 0, **options) -> Extractor:
    """The extractor registered as `name`, configured by keyword `options` (unknown ones are a UserError)."""
    cls = extractor_class(name)
    known = extractor_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = ", ".join(f"{k}={v!r}" for k, v in known.items() if k != "seed") or "none"
        raise UserError(f"--condition {name}: unknown option(s) {', '.join(unknown)}; it accepts {accepted}")
    options = {key: coerce_option(name, key, value, known[key]) for key, value in options.items()}
    try:
        return cls(seed=seed, **options)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--condition {name}: {exc}") from None


def parse_options(items: list[str], flag: str) -> dict[str, str]:
    """KEY=VALUE words of a command line (`flag`'s values) as a dict of text; a word without '=' is a UserError."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE, e.g. low=50")
        options[key.strip()] = value.strip()
    return options


def coerce_option(name: str, key: str, value, default, flag: str = "--condition"):
    """Command-line option text to the type of the option's default ('150' -> 150 where the default is an int);
    a value of another type is a UserError naming `flag`."""
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    import yaml

    parsed = yaml.safe_load(value)
    kind = type(default)
    if kind is float and isinstance(parsed, int) and not isinstance(parsed, bool):
        parsed = float(parsed)
    if not isinstance(parsed, kind) or (kind is int and isinstance(parsed, bool)):
        raise UserError(f"{flag} {name}: option {key}={value!r} should be a {kind.__name__} like {default!r}")
    return parsed
