"""Conditions re-extracted from an image tensor with gradients: the consistency reward of ControlNet++ (Li et al.,
ECCV 2024, `zeroconv train --consistency_loss_weight`).

Each function takes images [N, 3, H, W] in [0, 1] and the conditions [N, C, H, W] in [0, 1] the ControlNet was
given, and returns the per-sample distance between the condition extracted from the images and the given one.
They stand beside the numpy extractors of this package (the same names), not in place of them: canny's
thresholds and scribble's morphology have no gradient, so the edge conditions share one soft-edge operator (the
Sobel magnitude of the luma, squashed to [0, 1)) and are compared after a 1-pixel Gaussian blur, so a line one
pixel off costs little and a missing line costs its full weight. Grayscale is exact (the BT.601 luma of
cv2.COLOR_RGB2GRAY). Conditions without one here (depth, segmentation, palette, blur with a random strength,
inpaint masks, landmarks) are refused by `check_differentiable` with the list of those that have one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeroconv.errors import UserError

LUMA = (0.299, 0.587, 0.114)  # cv2.COLOR_RGB2GRAY
EDGE_SCALE = 0.25  # a full black-to-white step gives a Sobel magnitude of 4: tanh(16), i.e. 1
EDGE_BLUR_SIGMA = 1.0


def luma(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images[:, :3] * weights).sum(dim=1, keepdim=True)


def soft_edges(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1): 0 on flat regions, near 1 on a strong step."""
    gray = F.pad(luma(images), (1, 1, 1, 1), mode="replicate")
    sobel_x = gray.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx = F.conv2d(gray, sobel_x)
    gy = F.conv2d(gray, sobel_x.transpose(2, 3))
    return torch.tanh(torch.sqrt(gx * gx + gy * gy + 1e-8) / EDGE_SCALE)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps ** 2) / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.transpose(2, 3), groups=x.shape[1])


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(dim=1)


def edge_distance(images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    given = conditions[:, :3].amax(dim=1, keepdim=True)  # white lines on black, any channel count
    return per_sample_mse(gaussian_blur(soft_edges(images), EDGE_BLUR_SIGMA), gaussian_blur(given, EDGE_BLUR_SIGMA))


def grayscale_distance(images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    given = conditions[:, :1] if conditions.shape[1] == 1 else luma(conditions)
    return per_sample_mse(luma(images), given)


# condition name (zeroconv.data.conditions.EXTRACTORS) -> distance
DISTANCES = {"canny": edge_distance, "scribble": edge_distance, "softedge": edge_distance,
             "lineart": edge_distance, "grayscale": grayscale_distance}


def check_differentiable(name: str | None, flag: str = "--consistency_condition"):
    """The distance of condition `name`, or a UserError naming the ones there are."""
    if name in DISTANCES:
        return DISTANCES[name]
    known = ", ".join(sorted(DISTANCES))
    if name is None:
        raise UserError(f"--consistency_loss_weight needs to know the condition: give {flag} (one of {known}; the "
                        "Fill outlines are edges: canny), or --condition")
    raise UserError(f"{flag} {name}: no differentiable extractor for it yet (there is one for {known}); train "
                    "without --consistency_loss_weight")
