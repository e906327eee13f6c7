"""One image normalisation (zeroconv.data.transforms.normalize): a photo reaches training with the same pixels
whether it went through `zeroconv prepare` first or was read by `zeroconv train`'s loader directly."""

import json

import numpy as np
import torch
from PIL import Image

from zeroconv.config import TrainConfig
from zeroconv.data.dataset import ControlNetDataset
from zeroconv.data.prepare import main as prepare_main
from zeroconv.data.sources import load_examples
from zeroconv.data.transforms import PairedTransform

WIDTH, HEIGHT = 32, 24  # the shorter side is --resolution: prepare resizes nothing, so any difference is a mode's


def photo() -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x * 255 // (WIDTH - 1), y * 255 // (HEIGHT - 1), (x * y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def write_modes(folder) -> list[str]:
    """The same photo in every mode a file can bring, and as a JPEG stored sideways with an EXIF rotation."""
    rgb = photo()
    gray = np.asarray(rgb.convert("L"))
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, WIDTH, dtype=np.uint8), (HEIGHT, 1)), "L")
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    files = {
        "rgb.png": rgb, "l.png": rgb.convert("L"), "p.png": rgb.quantize(16), "rgba.png": rgba, "la.png": la,
        "cmyk.jpg": rgb.convert("CMYK"),
        "i16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "i32.tif": Image.fromarray(gray.astype(np.int32) * 257, "I"),
        "i8.tif": Image.fromarray(gray.astype(np.int32), "I"),  # 32-bit ints holding 8-bit values
        "f.tif": Image.fromarray(gray.astype(np.float32) / 255.0, "F"),
        "f255.tif": Image.fromarray(gray.astype(np.float32), "F"),  # floats on the 0..255 scale
    }
    for name, image in files.items():
        image.save(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rgb.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif, quality=90)
    return [*files, "rotated.jpg"]


def loader_pixels(folder, names: list[str]) -> dict[str, torch.Tensor]:
    """Each file as `zeroconv train`'s loader hands it to the VAE."""
    condition = folder / "condition.png"
    Image.new("RGB", (WIDTH, HEIGHT)).save(condition)
    with open(folder / "metadata.jsonl", "w") as fh:
        for name in names:
            fh.write(json.dumps({"file_name": name, "conditioning_image_file_name": condition.name, "text": name})
                     + "\n")
    dataset = ControlNetDataset(load_examples(TrainConfig(train_data_dir=str(folder), resolution=HEIGHT)),
                                PairedTransform(HEIGHT))
    return {item["caption"]: item["pixel_values"] for item in (dataset[i] for i in range(len(dataset)))}


def test_prepare_and_the_training_loader_give_identical_pixels_in_every_mode(tmp_path):
    photos, direct = tmp_path / "photos", tmp_path / "direct"
    photos.mkdir()
    names = write_modes(photos)
    assert {Image.open(photos / n).mode for n in names} >= {"RGB", "L", "P", "RGBA", "LA", "CMYK", "F"}
    assert {Image.open(photos / n).mode for n in ("i16.png", "i32.tif")} <= {"I;16", "I"}
    out = tmp_path / "prepared"
    assert prepare_main(["--images", str(photos), "--condition", "canny", "--out", str(out), "--resolution",
                         str(HEIGHT), "--num_proc", "1"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == len(names)
    prepared = {}
    transform = PairedTransform(HEIGHT)
    for row in rows:
        with Image.open(out / row["file_name"]) as image:
            assert image.mode == "RGB"
            prepared[row["file_name"]] = transform(image, Image.new("RGB", image.size))[0]

    direct.mkdir()
    for name in names:
        (direct / name).write_bytes((photos / name).read_bytes())
    loaded = loader_pixels(direct, names)
    for name in names:
        stem = name.rsplit(".", 1)[0]
        ours = prepared[f"images/{stem}.png"]
        assert torch.equal(ours, loaded[name]), f"{name}: prepare and the training loader disagree"
    # the rotation was applied (upright 24 wide, 32 tall before the crop), not ignored by both
    assert not torch.equal(loaded["rotated.jpg"], loaded["rgb.png"])
    # and the conversions are the ones meant: gray modes are the photo's gray, alpha goes on white
    assert torch.equal(loaded["i16.png"], loaded["l.png"]) and torch.equal(loaded["i32.tif"], loaded["l.png"])
    for name in ("i8.tif", "f.tif", "f255.tif"):
        assert torch.equal(loaded[name], loaded["l.png"]), name
