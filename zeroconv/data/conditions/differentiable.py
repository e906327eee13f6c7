"""Conditions re-extracted from an image tensor with gradients: the consistency reward of ControlNet++ (Li et al.,
ECCV 2024, `zeroconv train --consistency_loss_weight`).

Each distance takes images [N, 3, H, W] in [0, 1] and the conditions [N, C, H, W] in [0, 1] the ControlNet was
given, and returns the per-sample distance [N] (float32) between the condition extracted from the images and the
given one, differentiable in the images. They stand beside the numpy extractors of this package (the same names
and the same options), not in place of them:

- canny, scribble, softedge, lineart: canny's thresholds and scribble's morphology have no gradient, so the edge
  conditions share one soft-edge operator (the Sobel magnitude of the luma, squashed to [0, 1)) and are compared
  after a 1-pixel Gaussian blur, so a line one pixel off costs little and a missing line costs its full weight.
- grayscale: exact (the BT.601 luma of cv2.COLOR_RGB2GRAY), MSE.
- blur: the images blurred at the extractor's fixed `sigma` (cv2.GaussianBlur's kernel and border), MSE. `sigma`
  is in pixels of the training images: conditions blurred at another scale need it scaled. A random strength
  (`sigma_max`) is refused: which sigma each condition got is not known.
- inpaint (`output` masked or rgba): the known pixels of the images against the condition's, MSE over the pixels
  outside the hole. rgba: the hole is where alpha is over one half. masked: the hole is where every channel
  equals `fill` (within half a level), an approximation: known pixels that happen to be exactly the fill color
  are left out too (they cost nothing). `output=mask` is refused: the mask holds nothing of the image.
- depth: the frozen depth model (`model`, default Intel/dpt-hybrid-midas, as `zeroconv prepare`) run on the
  images after its image processor's resize and normalisation done as tensor operations; the predicted depth
  resized back (bicubic, as the depth-estimation pipeline) and min-max scaled per image exactly as Depth.extract
  (near = white, unrounded), MSE against the condition's luma (its one channel for 1-channel conditions).
- segmentation: the frozen semantic segmentation model (`model`, default
  nvidia/segformer-b0-finetuned-ade-512-512)'s logits upsampled to the image (bilinear, as the pipeline), cross
  entropy (ControlNet++'s loss for segmentation) against the class ids read back from the condition's colors: each
  pixel's nearest `class_palette` color, so colors blended by a bilinear resize of the condition fall to one of
  their neighbours (`--image_interpolation_mode nearest` keeps them exact).

The model-based ones load their model once, frozen (no gradient to its weights, eval mode) on the training device
in the training's weight dtype. Conditions without a distance here (palette, landmarks) are refused by
`check_differentiable`, which lists those that have one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from zeroconv.errors import UserError

FLAG = "--consistency_condition"
OPTIONS_FLAG = "--consistency_condition_options"
LUMA = (0.299, 0.587, 0.114)  # cv2.COLOR_RGB2GRAY
EDGE_SCALE = 0.25  # a full black-to-white step gives a Sobel magnitude of 4: tanh(16), i.e. 1
EDGE_BLUR_SIGMA = 1.0
HALF_LEVEL = 0.5 / 255  # conditions are 8-bit images: values closer than this are the same level

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def gaussian_blur(x: torch.Tensor, sigma: float, border: str = "replicate") -> torch.Tensor:
    """A separable Gaussian of radius round(3 sigma) (cv2.GaussianBlur's kernel for 8-bit images at ksize (0, 0)).
    border 'reflect' is cv2's default BORDER_REFLECT_101; an image no larger than the radius is replicated."""
    radius = max(1, int(3 * sigma + 0.5))
    if border == "reflect" and radius >= min(x.shape[-2:]):
        border = "replicate"  # reflect padding needs the image to be larger than the pad
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps ** 2) / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=border), kernel, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode=border), kernel.transpose(2, 3), groups=x.shape[1])


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(dim=1)


def gray_or_color(images: torch.Tensor, conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and conditions in the condition's colors: luma against a 1-channel condition, RGB otherwise."""
    if conditions.shape[1] == 1:
        return luma(images), conditions
    return images[:, :3], conditions[:, :3]


def edge_distance(images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    given = conditions[:, :3].amax(dim=1, keepdim=True)  # white lines on black, any channel count
    return per_sample_mse(gaussian_blur(soft_edges(images), EDGE_BLUR_SIGMA), gaussian_blur(given, EDGE_BLUR_SIGMA))


def grayscale_distance(images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    given = conditions[:, :1] if conditions.shape[1] == 1 else luma(conditions)
    return per_sample_mse(luma(images), given)


class BlurDistance:
    """MSE between the images blurred at `sigma` (Blur's fixed strength) and the given blur."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        ours, given = gray_or_color(gaussian_blur(images, self.sigma, border="reflect"), conditions)
        return per_sample_mse(ours, given)


class InpaintDistance:
    """MSE of the known pixels (outside the hole the condition shows) between the images and the condition; 0 for
    a sample whose condition is all hole."""

    def __init__(self, output: str, fill: int):
        self.output, self.fill = output, fill

    def known(self, conditions: torch.Tensor) -> torch.Tensor:
        """[N, 1, H, W], 1 outside the hole."""
        if self.output == "rgba":
            return (conditions[:, 3:4] < 0.5).to(conditions.dtype)
        # [:3]: a 4-channel run gives an RGB condition an opaque alpha, which is no color
        hole = ((conditions[:, :3] - self.fill / 255).abs() <= HALF_LEVEL).all(dim=1, keepdim=True)
        return (~hole).to(conditions.dtype)

    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        known = self.known(conditions)
        if self.output == "rgba":
            conditions = conditions[:, :3]
        ours, given = gray_or_color(images, conditions)
        squared = ((ours - given) ** 2 * known).flatten(1).sum(dim=1)
        return squared / (known.flatten(1).sum(dim=1) * ours.shape[1]).clamp_min(1)


# --- the model-based ones ---------------------------------------------------------------------------------------

RESIZE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's filter numbers, as image processors store them


class ProcessorInput:
    """An image processor's resize, rescale and normalisation (transformers' DPT / Segformer-style processors) as
    tensor operations, so the gradient reaches the images: resized with F.interpolate (antialiased, as the
    processors' resize) to the processor's size (height x width; or shortest_edge; DPT's keep_aspect_ratio and
    ensure_multiple_of), then (x - mean) / std. Processors that crop or pad are refused."""

    def __init__(self, processor, where: str):
        for step in ("do_center_crop", "do_pad"):
            if getattr(processor, step, False):
                raise UserError(f"{where}: its image processor {step.removeprefix('do_').replace('_', ' ')}s, which "
                                "the consistency reward does not reproduce; use a model whose processor only "
                                "resizes and normalises (model=...)")
        self.do_resize = bool(getattr(processor, "do_resize", True))
        size = getattr(processor, "size", None) or {}
        read = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
        self.height, self.width, self.shortest_edge = read("height"), read("width"), read("shortest_edge")
        if self.do_resize and not (self.height and self.width) and not self.shortest_edge:
            raise UserError(f"{where}: its image processor's size {size!r} has neither height and width nor "
                            "shortest_edge; use a model with one of those (model=...)")
        self.keep_aspect_ratio = bool(getattr(processor, "keep_aspect_ratio", False))
        self.multiple = int(getattr(processor, "ensure_multiple_of", None) or 1)
        resample = getattr(processor, "resample", 2)
        resample = getattr(resample, "value", resample)  # PIL's enum or torchvision's InterpolationMode
        # the other PIL filters (lanczos, box, hamming) have no F.interpolate mode: bilinear is the nearest
        self.mode = resample if resample in RESIZE_MODES.values() else RESIZE_MODES.get(resample, "bilinear")
        scale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1
        self.scale = 255 * scale  # the images are already pixel / 255
        self.mean = self.std = None
        if getattr(processor, "do_normalize", False):
            self.mean, self.std = processor.image_mean, processor.image_std

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        if self.shortest_edge and not (self.height and self.width):
            ratio = self.shortest_edge / min(height, width)
            return max(1, round(height * ratio)), max(1, round(width * ratio))
        scale_h, scale_w = self.height / height, self.width / width
        if self.keep_aspect_ratio:  # DPT: scale as little as possible
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        return self.multiple_of(scale_h * height), self.multiple_of(scale_w * width)

    def multiple_of(self, value: float) -> int:
        return max(self.multiple, round(value / self.multiple) * self.multiple)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images[:, :3]
        if self.do_resize:
            size = self.size_for(*x.shape[-2:])
            if size != tuple(x.shape[-2:]):
                smooth = self.mode != "nearest"
                x = F.interpolate(x, size=size, mode=self.mode, antialias=smooth,
                                  **({"align_corners": False} if smooth else {}))
        x = x * self.scale
        if self.mean is not None:
            x = (x - x.new_tensor(self.mean).view(1, -1, 1, 1)) / x.new_tensor(self.std).view(1, -1, 1, 1)
        return x


class ModelDistance:
    """A frozen transformers model with its processor's input, loaded once from `model` (local folder or hub id)
    on `device` in `dtype`: its weights take no gradient and it stays in eval mode; its input and output go
    through its dtype and back to float32, with gradients."""

    name = ""
    auto_class = ""

    def __init__(self, model: str, device, dtype: torch.dtype):
        import transformers

        where = f"{FLAG} {self.name}, {OPTIONS_FLAG} model={model}"
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(model)
            net = getattr(transformers, self.auto_class).from_pretrained(model, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{where}: cannot load it as a {self.auto_class} with its image processor "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                            f"pass a local folder (config, weights, image processor) or a reachable hub id with "
                            f"{OPTIONS_FLAG} model=..., or train without --consistency_loss_weight") from None
        self.model, self.dtype = model, dtype
        self.input = ProcessorInput(processor, where)
        self.net = net.to(device).eval().requires_grad_(False)

    def run(self, images: torch.Tensor):
        return self.net(pixel_values=self.input(images).to(self.dtype))


class DepthDistance(ModelDistance):
    """MSE between the model's depth, min-max scaled per image (Depth.extract's scaling), and the given depth."""

    name = "depth"
    auto_class = "AutoModelForDepthEstimation"

    def depth(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1, H, W] in [0, 1]: near = 1, each image's nearest point 1 and farthest 0 (0 where flat)."""
        predicted = self.run(images).predicted_depth.float()
        if predicted.dim() == 3:
            predicted = predicted[:, None]
        depth = F.interpolate(predicted, size=images.shape[-2:], mode="bicubic", align_corners=False)
        low = depth.amin(dim=(2, 3), keepdim=True)
        span = depth.amax(dim=(2, 3), keepdim=True) - low
        return (depth - low) / span.clamp_min(1e-12)  # a flat map: 0 / tiny = 0, as Depth.extract's zeros

    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        given = conditions[:, :1] if conditions.shape[1] == 1 else luma(conditions)
        return per_sample_mse(self.depth(images), given)


class SegmentationDistance(ModelDistance):
    """Per-pixel cross entropy of the model's upsampled logits against the class ids of the given colors."""

    name = "segmentation"
    auto_class = "AutoModelForSemanticSegmentation"

    def __init__(self, model: str, device, dtype: torch.dtype):
        super().__init__(model, device, dtype)
        from zeroconv.data.conditions.models import class_palette

        self.palette = torch.as_tensor(class_palette(len(self.net.config.id2label)), dtype=torch.float32,
                                       device=device)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, classes, H, W] float32."""
        logits = self.run(images).logits.float()
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def class_ids(self, conditions: torch.Tensor) -> torch.Tensor:
        """[N, H, W] long: each pixel's nearest palette color (L1 in 0..255), one class at a time so no [N,
        classes, H, W] distance tensor is held."""
        with torch.no_grad():
            pixels = conditions[:, :3].float() * 255
            best = torch.full(pixels.shape[:1] + pixels.shape[2:], float("inf"), device=pixels.device)
            ids = torch.zeros(best.shape, dtype=torch.long, device=pixels.device)
            for k, color in enumerate(self.palette.to(pixels.device)):
                gap = (pixels - color.view(1, 3, 1, 1)).abs().sum(dim=1)
                closer = gap < best
                best, ids = torch.where(closer, gap, best), torch.where(closer, k, ids)
        return ids

    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(self.logits(images), self.class_ids(conditions), reduction="none")
        return ce.flatten(1).mean(dim=1)


# --- names and options ------------------------------------------------------------------------------------------

# condition name (zeroconv.data.conditions.EXTRACTORS) -> distance, for those without options
DISTANCES = {"canny": edge_distance, "scribble": edge_distance, "softedge": edge_distance,
             "lineart": edge_distance, "grayscale": grayscale_distance}
# condition name -> the extractor options its distance reads (the rest would change nothing: refused)
OPTIONS = {"blur": ("sigma", "sigma_max"), "inpaint": ("output", "fill"), "depth": ("model",),
           "segmentation": ("model",)}
SUPPORTED = sorted([*DISTANCES, *OPTIONS])

Builder = Callable[[object, torch.dtype], Distance]  # (device, dtype) -> distance


def check_differentiable(name: str | None, options: dict | None = None, *, channels: int | None = None,
                         flag: str = FLAG) -> Builder:
    """How to build condition `name`'s distance under `options` (the numpy extractor's own keys, text or typed,
    e.g. {'sigma': '2'}): a function (device, dtype) -> distance. Checks the name, every option and the
    conditioning `channels` the distance needs, and loads nothing; each mistake is a UserError naming the flag and
    the fix (an unknown name lists every condition that has a distance)."""
    known = ", ".join(SUPPORTED)
    if name is None:
        raise UserError(f"--consistency_loss_weight needs to know the condition: give {flag} (one of {known}; the "
                        "Fill outlines are edges: canny), or --condition")
    if name not in DISTANCES and name not in OPTIONS:
        raise UserError(f"{flag} {name}: no differentiable extractor for it yet (there is one for {known}); train "
                        "without --consistency_loss_weight")
    options = dict(options or {})
    accepted = OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) or "none"
        raise UserError(f"{OPTIONS_FLAG} {', '.join(unknown)}: not an option of the {name} consistency reward (it "
                        f"takes {takes}); drop it")
    if name in DISTANCES:
        return lambda device, dtype: DISTANCES[name]
    extractor = configured_extractor(name, options, flag)
    if name == "blur":
        if extractor.sigma_max > extractor.sigma:
            raise UserError(f"{flag} blur with {OPTIONS_FLAG} sigma_max={extractor.sigma_max}: a blur of random "
                            "strength cannot be re-extracted (which sigma each condition got is not known); give "
                            "the fixed sigma the conditions were blurred with (sigma=S, no sigma_max), or train "
                            "without --consistency_loss_weight")
        return lambda device, dtype: BlurDistance(extractor.sigma)
    if name == "inpaint":
        if extractor.output == "mask":
            raise UserError(f"{flag} inpaint with output=mask: the mask holds nothing of the image, so there is "
                            "nothing to re-extract; train on output=masked or rgba conditions, or without "
                            "--consistency_loss_weight")
        if extractor.output == "rgba" and channels not in (None, 4):
            raise UserError(f"{flag} inpaint with output=rgba reads the hole from the alpha channel, which "
                            f"--conditioning_channels {channels} drops; train with --conditioning_channels 4")
        return lambda device, dtype: InpaintDistance(extractor.output, extractor.fill)
    if name == "segmentation" and channels == 1:
        raise UserError(f"{flag} segmentation reads the classes from the condition's colors, which "
                        "--conditioning_channels 1 turns gray; train with --conditioning_channels 3")
    cls = DepthDistance if name == "depth" else SegmentationDistance
    return lambda device, dtype: cls(extractor.model, device, dtype)


def configured_extractor(name: str, options: dict, flag: str):
    """The numpy extractor `name` with `options` (typed like their defaults): the distance reads its settings, so
    both accept the same values and defaults. Loads no model."""
    from zeroconv.data.conditions import coerce_option, extractor_class, extractor_options

    defaults = extractor_options(name)
    typed = {key: coerce_option(name, key, value, defaults[key], flag=OPTIONS_FLAG)
             for key, value in options.items()}
    try:
        return extractor_class(name)(seed=0, **typed)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{flag} {name}, {OPTIONS_FLAG}: {exc}") from None


def differentiable_distance(name: str | None, options: dict | None = None, *, device="cpu",
                            dtype: torch.dtype = torch.float32, channels: int | None = None) -> Distance:
    """The distance of condition `name` (see check_differentiable), its model if any loaded now, once."""
    return check_differentiable(name, options, channels=channels)(device, dtype)
