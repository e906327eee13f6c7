"""Image and condition to tensors, with one geometry for both: the pixels of a condition stay on its image's.

`PairedTransform(R, C)(image, condition, flip)` converts the image to RGB and the condition to L/RGB/RGBA,
resizes the shorter side to R and crops R x R (one resample through `ImageOps.fit`, bilinear like diffusers'
script; centered, or where `crop()` put it with random_crop), flips both when asked, and returns float32
tensors: the image in [-1, 1] as the VAE wants it, the condition in [0, 1] as the ControlNet reads it.
With a target size W x H (an aspect bucket, zeroconv.data.buckets) the image is resized to cover W x H instead
and cropped to it, the same way. `crop()` also says what SDXL's size conditioning reads: the original size and
the crop's top-left corner in the resized image. PIL and numpy only: it runs per sample per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

CONDITION_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# --image_interpolation_mode: torchvision's InterpolationMode names (diffusers' SDXL scripts) -> PIL's filters
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
                  "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; skips exif_transpose's full copy when there is nothing to turn."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def is_16bit(image: Image.Image) -> bool:
    return image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and (image.getextrema()[1] or 0) > 255)


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale to L by scaling, not clipping (PIL's convert clips 0..65535 to 0..255).
    I;16 spans 0..65535; I is read as 16-bit when a value exceeds 255 (PNG decoders hand 16-bit gray out as I),
    else as 8-bit values; F spans 0..1 when no value exceeds 1, else 0..255."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        array = np.asarray(image, dtype=np.float32)
        if is_16bit(image):
            array = array / 257.0
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        array = array * 255.0 if array.size and float(array.max()) <= 1.0 else array
    else:
        return image
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def normalize(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any PIL image as upright 8-bit RGB, and a note per conversion (prepare's report lists them). The one
    conversion of a photo: prepare writes this, and the training loader (so the cache), sampling and evaluation
    read files through it, so a photo reaches training with the same pixels whether it was prepared or not.
    Transparent pixels go on white: their hidden color is arbitrary (often black), and a model should not learn
    it."""
    notes = []
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation not in (0, 1, None):
        image = ImageOps.exif_transpose(image)
        notes.append(f"EXIF orientation {orientation} applied")
    mode = image.mode
    if mode == "RGB":
        return image, notes
    eight = to_8bit(image)
    if eight is not image:
        notes.append(f"{mode} ({'16-bit' if is_16bit(image) else 'high bit depth'}) -> RGB")
        return eight.convert("RGB"), notes
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"{mode} -> RGB (transparency on white)")
        return Image.alpha_composite(background, rgba).convert("RGB"), notes
    notes.append(f"{mode} -> RGB")
    return image if image.mode == "RGB" else image.convert("RGB"), notes


def to_rgb(image: Image.Image) -> Image.Image:
    """normalize without its notes."""
    return normalize(image)[0]


def to_condition_mode(image: Image.Image, channels: int) -> Image.Image:
    """A conditioning image upright with `channels` channels: 1 -> L, 3 -> RGB, 4 -> RGBA. Plain conversion
    (alpha dropped, not composited): a condition's values are data, and validation reads them the same way."""
    mode = CONDITION_MODES[channels]
    image = to_8bit(upright(image))
    if image.mode == "P" and mode != "RGBA":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image if image.mode == mode else image.convert(mode)


def to_tensor(image: Image.Image, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """HWC uint8 PIL -> CHW float32 in [low, high]. The layout change is done on uint8 (a quarter of the bytes),
    then one float pass: ~9x faster than converting to float first."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    chw = torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))  # a writable copy
    return chw.to(torch.float32).mul_((high - low) / 255.0).add_(low)


CENTER = (0.5, 0.5)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, without applying it."""
    width, height = image.size
    turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


@dataclass(frozen=True)
class Crop:
    """Where one sample's crop lies: `centering` as ImageOps.fit takes it (fractions of the free space), the
    original (height, width), the crop's (top, left) in the image resized to cover the target, unflipped, and the
    target (width, height): R x R, or the sample's aspect bucket."""

    centering: tuple[float, float]
    original_size: tuple[int, int]
    top_left: tuple[int, int]
    free: tuple[float, float]  # (rows, columns) of the resized image outside the crop
    target: tuple[int, int] = (0, 0)

    def size_and_crop(self, flip: bool) -> tuple[int, int, int, int]:
        """(original h, w, crop top, left) as SDXL's micro-conditioning reads it: a flipped sample's crop is
        counted from the left edge of the flipped image, as diffusers' SDXL scripts flip before cropping."""
        top, left = self.top_left
        if flip:
            left = int(round(self.free[1])) - left
        return (*self.original_size, top, left)


class PairedTransform:
    def __init__(self, resolution: int, conditioning_channels: int = 3, random_crop: bool = False,
                 interpolation: str = "bilinear"):
        if conditioning_channels not in CONDITION_MODES:
            raise ValueError(f"conditioning_channels must be 1, 3 or 4, got {conditioning_channels}")
        self.resample = INTERPOLATIONS[interpolation]
        self.interpolation = interpolation
        self.resolution = resolution
        self.conditioning_channels = conditioning_channels
        self.random_crop = random_crop

    def crop(self, size: tuple[int, int], draw: tuple[float, float] = CENTER,
             target: tuple[int, int] | None = None) -> Crop:
        """The crop of an upright image of `size` (width, height) to `target` (width, height; default R x R),
        once resized to cover it: centered, or with random_crop at a whole-pixel offset of the resized image
        picked by `draw` (two uniforms in [0, 1), rows then columns)."""
        width, height = size
        target_width, target_height = target or (self.resolution, self.resolution)
        scale = max(target_width / width, target_height / height)
        free = (max(height * scale - target_height, 0.0), max(width * scale - target_width, 0.0))
        target = (target_width, target_height)
        if not self.random_crop:
            return Crop(CENTER, (height, width), (int(round(free[0] / 2)), int(round(free[1] / 2))), free, target)
        # whole pixels of the resized image, so the offset SDXL is told is the one applied
        offsets = [min(int(u * (int(f) + 1)), int(f)) for u, f in zip(draw, free)]
        # ImageOps.fit takes (x, y) centering
        centering = tuple(o / f if f > 0 else 0.5 for o, f in zip(reversed(offsets), reversed(free)))
        return Crop(centering, (height, width), (offsets[0], offsets[1]), free, target)

    def fit(self, image: Image.Image, centering: tuple[float, float] = CENTER,
            size: tuple[int, int] | None = None) -> Image.Image:
        """Resize to cover `size` (width, height; default R x R), crop it at `centering`, in one resample (no-op
        when already that size)."""
        size = size or (self.resolution, self.resolution)
        return image if image.size == size else ImageOps.fit(image, size, self.resample, centering=centering)

    def fit_image(self, image: Image.Image, centering: tuple[float, float] = CENTER,
                  size: tuple[int, int] | None = None) -> Image.Image:
        """The target image as trained on, before flip: upright RGB, R x R or `size` (what a condition extractor
        sees)."""
        return self.fit(to_rgb(image), centering, size)

    def __call__(self, image: Image.Image, condition: Image.Image, flip: bool = False,
                 centering: tuple[float, float] = CENTER, size: tuple[int, int] | None = None):
        return self.image_tensor(image, flip, centering, size), self.condition_tensor(condition, flip, centering, size)

    def image_tensor(self, image: Image.Image, flip: bool = False, centering: tuple[float, float] = CENTER,
                     size: tuple[int, int] | None = None) -> torch.Tensor:
        """The target image as trained on, [3, H, W] in [-1, 1]."""
        image = self.fit_image(image, centering, size)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image, -1.0, 1.0)

    def condition_tensor(self, condition: Image.Image, flip: bool = False, centering: tuple[float, float] = CENTER,
                         size: tuple[int, int] | None = None) -> torch.Tensor:
        """A condition on its image's pixels, [C, H, W] in [0, 1] (a union ControlNet's row has several)."""
        condition = self.fit(to_condition_mode(condition, self.conditioning_channels), centering, size)
        if flip:
            condition = condition.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(condition)


def load_condition(path: str | Path, resolution: int, channels: int, interpolation: str = "bilinear") -> torch.Tensor:
    """A conditioning image as the ControlNet sees it in training: [1, C, R, R] in [0, 1]."""
    with Image.open(path) as image:
        condition = PairedTransform(resolution, channels, interpolation=interpolation).fit(
            to_condition_mode(image, channels))
    return to_tensor(condition).unsqueeze(0)
