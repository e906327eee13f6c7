import numpy as np
import pytest
import torch
from PIL import Image

from zeroconv.data.transforms import PairedTransform


def stripes(width=96, height=48, seed=0):
    """A random RGB image: any misalignment or wrong crop shows in the pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_shapes_dtypes_and_ranges(channels):
    image = stripes()
    condition = Image.fromarray(np.asarray(image)).convert("RGBA")
    pixels, cond = PairedTransform(32, channels)(image, condition, flip=False)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert cond.shape == (channels, 32, 32) and cond.dtype == torch.float32
    assert -1.0 <= pixels.min() < -0.5 and 0.5 < pixels.max() <= 1.0
    assert 0.0 <= cond.min() and cond.max() <= 1.0


def test_center_crop_of_shorter_side():
    array = np.zeros((32, 96, 3), np.uint8)
    array[:, :32] = (255, 0, 0)
    array[:, 32:64] = (0, 255, 0)
    array[:, 64:] = (0, 0, 255)
    pixels, cond = PairedTransform(16)(Image.fromarray(array), Image.fromarray(array), flip=False)
    # the middle third (green) fills the crop; the 1-px border may blend with the neighbours
    inner = pixels[:, :, 1:-1]
    assert torch.allclose(inner[1], torch.ones_like(inner[1])) and (inner[0] == -1).all() and (inner[2] == -1).all()
    assert torch.allclose(cond, (pixels + 1) / 2, atol=1e-6)  # same geometry for both


def test_condition_follows_image_geometry_and_flip():
    image = stripes(80, 40)
    transform = PairedTransform(24, 3)
    pixels, cond = transform(image, image.copy(), flip=False)
    assert torch.allclose(cond, (pixels + 1) / 2, atol=1e-6)
    flipped_pixels, flipped_cond = transform(image, image.copy(), flip=True)
    assert torch.equal(flipped_pixels, pixels.flip(-1))
    assert torch.equal(flipped_cond, cond.flip(-1))
    assert not torch.equal(flipped_pixels, pixels)


def test_same_aspect_condition_of_other_size_is_aligned():
    image = stripes(64, 32).resize((128, 64), Image.Resampling.NEAREST)
    condition = stripes(64, 32)  # half the size, same content
    pixels, cond = PairedTransform(16)(image, condition, flip=False)
    assert (cond - (pixels + 1) / 2).abs().mean() < 0.02


def test_rgba_and_la_are_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:8, ..., 3] = 255  # top half opaque, bottom transparent (hidden color dark)
    pixels, _ = PairedTransform(16)(Image.fromarray(rgba, "RGBA"), Image.new("L", (16, 16)), flip=False)
    assert torch.allclose(pixels[:, 8:], torch.ones(3, 8, 16))
    assert torch.allclose(pixels[0, :8], torch.full((8, 16), 10 / 127.5 - 1))
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    pixels, _ = PairedTransform(16)(la, Image.new("L", (16, 16)), flip=False)
    assert torch.allclose(pixels[:, 8:], torch.ones(3, 8, 16))


def test_palette_with_transparency_and_cmyk():
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 16, 8))
    palette.info["transparency"] = 0  # index 0 (red) is transparent
    pixels, _ = PairedTransform(16)(palette, Image.new("L", (16, 16)), flip=False)
    assert torch.allclose(pixels[:, 8:], torch.ones(3, 8, 16))  # transparent red -> white
    assert torch.allclose(pixels[:, :8], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 8, 16))
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no black ink, full magenta + yellow: red
    pixels, _ = PairedTransform(16)(cmyk, Image.new("L", (16, 16)), flip=False)
    assert torch.allclose(pixels, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    array = np.zeros((16, 16), np.uint16)
    array[:, 8:] = 32896  # 128 * 257
    array[:, 12:] = 65535
    path = tmp_path / "depth16.png"
    Image.fromarray(array).save(path)
    sixteen = Image.open(path)
    assert sixteen.mode.startswith("I")
    pixels, cond = PairedTransform(16, 1)(sixteen, Image.open(path), flip=False)
    assert cond[0, 0, 4] == 0 and abs(cond[0, 0, 9] - 128 / 255) < 1e-6 and cond[0, 0, 14] == 1
    assert torch.allclose(pixels[:, 0, 14], torch.ones(3)) and torch.allclose(pixels[:, 0, 4], -torch.ones(3))


def test_exif_orientation_is_applied_to_both(tmp_path):
    image = stripes(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    upright = image.transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    transform = PairedTransform(16)
    pixels, cond = transform(Image.open(path), Image.open(path), flip=False)
    expected_pixels, expected_cond = transform(upright, upright, flip=False)
    assert torch.equal(pixels, expected_pixels) and torch.equal(cond, expected_cond)
    unturned, _ = transform(image, image, flip=False)
    assert not torch.equal(pixels, unturned)


def test_image_interpolation_mode_nearest_keeps_a_conditions_values():
    rng = np.random.default_rng(0)
    labels = Image.fromarray((rng.integers(0, 2, (20, 30)) * 255).astype(np.uint8), "L")
    image = Image.new("RGB", (30, 20))
    _, nearest = PairedTransform(16, 1, interpolation="nearest")(image, labels)
    _, bilinear = PairedTransform(16, 1)(image, labels)
    assert set(nearest.unique().tolist()) == {0.0, 1.0}
    assert len(bilinear.unique()) > 2  # the default blends neighbours: the flag does change the filter
