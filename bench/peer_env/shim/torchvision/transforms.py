"""torchvision.transforms, the subset diffusers' ControlNet example scripts use (see the package docstring)."""

from __future__ import annotations

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"


PIL_FILTERS = {InterpolationMode.NEAREST: Image.Resampling.NEAREST, InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
               InterpolationMode.BICUBIC: Image.Resampling.BICUBIC, InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
               InterpolationMode.BOX: Image.Resampling.BOX, InterpolationMode.HAMMING: Image.Resampling.HAMMING}


def _size_hw(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def _crop(image, top: int, left: int, height: int, width: int):
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + width, top + height))
    return image[..., top:top + height, left:left + width]


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    """An int resizes the shorter side to it, keeping the aspect ratio (torchvision's rule)."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError("this stand-in resizes PIL images only")
        h, w = image.height, image.width
        if isinstance(self.size, int) or len(self.size) == 1:
            short = self.size if isinstance(self.size, int) else self.size[0]
            if w <= h:
                new_w, new_h = short, int(short * h / w)
            else:
                new_h, new_w = short, int(short * w / h)
        else:
            new_h, new_w = self.size
        if (new_h, new_w) == (h, w):
            return image
        return image.resize((new_w, new_h), PIL_FILTERS[self.interpolation])


class CenterCrop:
    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, image):
        h, w = _size_hw(image)
        th, tw = self.size
        return _crop(image, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)


class RandomCrop:
    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    @staticmethod
    def get_params(image, output_size):
        h, w = _size_hw(image)
        th, tw = output_size
        return random.randint(0, h - th), random.randint(0, w - tw), th, tw

    def __call__(self, image):
        return _crop(image, *self.get_params(image, self.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image):
        if torch.rand(1).item() >= self.p:
            return image
        if isinstance(image, Image.Image):
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image.flip(-1)


class ToTensor:
    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(np.array(array.transpose(2, 0, 1))).to(torch.float32).div(255.0)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std
