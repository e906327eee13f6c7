import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zeroconv.config import parse
from zeroconv.data.conditions.landmarks import COLORS, region_of
from zeroconv.data.prepare import PrepareConfig, main, prepare
from zeroconv.errors import UserError
from tests.data.conditions.photos import face_landmarks, photo, write_ldmks

REPO = Path(__file__).resolve().parents[2]


def run(images, out, *flags) -> dict:
    cfg = parse(PrepareConfig, ["--images", str(images), "--out", str(out), *flags], prog="zeroconv prepare")
    return prepare(cfg)


def write_photos(folder: Path, n: int, size=(40, 48), start: int = 0) -> None:
    for i in range(start, start + n):
        sub = folder / ("nested/deeper" if i % 5 == 0 else "nested" if i % 5 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        suffix = [".png", ".jpg", ".webp", ".png"][i % 4]
        photo(*size, seed=i).save(sub / f"img{i:03d}{suffix}")


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_bad_files(folder: Path) -> dict[str, str]:
    """Ten bad files of different kinds -> the skip kind each must get."""
    good_png, good_jpg = png_bytes(photo(48, 48, 1)), png_bytes(photo(48, 48, 2), "JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (folder / "truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 3])
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (folder / "notes.png").write_text("this is a text file, not a picture\n" * 20)
    (folder / "page.webp").write_text("<html><body>404 not found</body></html>")
    (folder / "corrupt_header.png").write_bytes(good_png[:8] + b"\x00" * 64 + good_png[72:200])
    photo(16, 16, 3).save(folder / "tiny.png")
    photo(24, 20, 4).save(folder / "tiny.jpg")
    os.symlink(folder / "gone.jpg", folder / "broken_link.jpg")
    return {"empty.png": "empty", "truncated.png": "corrupt", "truncated.jpg": "corrupt", "noise.jpg": "not_image",
            "notes.png": "not_image", "page.webp": "not_image", "corrupt_header.png": "corrupt",
            "tiny.png": "too_small", "tiny.jpg": "too_small", "broken_link.jpg": "unreadable"}


def write_convertible_files(folder: Path) -> None:
    """Six odd but good images: CMYK, 16-bit gray, LA, P, RGBA, EXIF-rotated."""
    photo(40, 40, 5).convert("CMYK").save(folder / "cmyk.jpg")
    ramp = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "gray16.png")
    photo(40, 40, 6).convert("LA").save(folder / "la.png")
    photo(40, 40, 7).convert("P").save(folder / "palette.png")
    rgba = photo(40, 40, 8).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
    photo(48, 40, 9).save(folder / "rotated.jpg", exif=exif)


def dataset_files(out: Path) -> dict[str, bytes]:
    files = {"metadata.jsonl": (out / "metadata.jsonl").read_bytes()}
    for folder in ("images", "conditioning_images"):
        for path in sorted((out / folder).rglob("*")):
            if path.is_file():
                files[path.relative_to(out).as_posix()] = path.read_bytes()
    return files


def test_200_files_with_10_bad_ones_give_190_rows_and_a_report_naming_each(tmp_path, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    write_photos(images, 184)
    write_convertible_files(images)
    bad = write_bad_files(images)
    out = tmp_path / "out"
    code = main(["--images", str(images), "--condition", "canny", "--out", str(out), "--resolution", "32",
                 "--num_proc", "2"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 190
    assert set(rows[0]) == {"file_name", "conditioning_image_file_name", "text"}
    for row in rows[::17]:
        image, condition = Image.open(out / row["file_name"]), Image.open(out / row["conditioning_image_file_name"])
        assert image.size == condition.size and min(image.size) == 32 and image.mode == "RGB"
    report = json.loads((out / "report.json").read_text())
    assert {s["file"]: s["kind"] for s in report["skipped"]} == bad
    assert all(s["reason"] for s in report["skipped"])
    assert report["counts"]["prepared"] == 190 and report["counts"]["skipped"] == 10
    summary = capsys.readouterr().out
    assert "prepared 190 of 200 images, 10 skipped" in summary and "2 too_small" in summary
    converted = {c["file"]: " ".join(c["notes"]) for c in report["converted"]}
    assert "CMYK -> RGB" in converted["cmyk.jpg"] and "16-bit" in converted["gray16.png"]
    assert "transparency" in converted["rgba.png"] and "LA" in converted["la.png"]
    assert "EXIF orientation 6" in converted["rotated.jpg"]
    rotated = Image.open(out / "images/rotated.png")
    assert rotated.height > rotated.width  # stored 48x40, shown upright as 40x48
    ramp = np.asarray(Image.open(out / "images/gray16.png"))
    assert ramp.min() < 30 and ramp.max() > 225  # scaled to 8 bits, not clipped to white
    assert (out / "preview.png").is_file()


def test_killed_run_resumes_to_the_same_dataset_as_an_uninterrupted_one(tmp_path):
    images = tmp_path / "photos"
    write_photos(images, 300, size=(64, 64))
    flags = ["--condition", "canny", "--condition_options", "random_thresholds=true", "--resolution", "64",
             "--seed", "3"]
    reference = tmp_path / "reference"
    run(images, reference, *flags, "--num_proc", "1")

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "zeroconv", "prepare", "--images", str(images), "--out",
                                str(out), *flags, "--num_proc", "2"], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    items = out / ".prepare" / "items"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if items.is_dir() and sum(1 for _ in items.rglob("*.json")) >= 80:
            break
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    recorded = sum(1 for _ in items.rglob("*.json"))
    assert 80 <= recorded < 300 and not (out / "metadata.jsonl").exists(), "the run was not stopped halfway"

    report = run(images, out, *flags, "--num_proc", "2")
    assert report["counts"]["resumed"] == recorded and report["counts"]["prepared"] == 300
    assert dataset_files(out) == dataset_files(reference)


def test_strict_stops_at_the_first_bad_file(tmp_path):
    images = tmp_path / "photos"
    write_photos(images, 4)
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"broken.png: not an image .*--strict"):
        run(images, tmp_path / "out", "--condition", "canny", "--resolution", "32", "--strict", "--num_proc", "1")


def test_small_images_are_upscaled_on_request(tmp_path):
    images = tmp_path / "photos"
    write_photos(images, 3, size=(24, 20))
    report = run(images, tmp_path / "out", "--condition", "grayscale", "--resolution", "32", "--upscale_small",
                 "--num_proc", "1")
    assert report["counts"]["prepared"] == 3
    assert all("upscaled from 24x20" in c["notes"] for c in report["converted"])
    assert min(Image.open(tmp_path / "out/images/nested/deeper/img000.png").size) == 32


def test_captions_from_sidecars_mapping_file_and_template(tmp_path):
    images = tmp_path / "photos"
    write_photos(images, 4)
    (images / "nested/deeper/img000.txt").write_text("a red circle\n")
    (images / "img002.caption").write_text("a blue square")
    mapping = tmp_path / "captions.csv"
    mapping.write_text("file_name,text\nimg003.png,a green thing\nnested/img001.jpg,a cat\n")
    run(images, tmp_path / "out", "--condition", "canny", "--resolution", "32", "--caption_file", str(mapping),
        "--caption_template", "{caption}, {condition} of {stem}", "--num_proc", "1")
    texts = {json.loads(line)["file_name"]: json.loads(line)["text"]
             for line in (tmp_path / "out/metadata.jsonl").read_text().splitlines()}
    assert texts == {"images/nested/deeper/img000.png": "a red circle, canny of img000",
                     "images/nested/img001.png": "a cat, canny of img001",
                     "images/img002.png": "a blue square, canny of img002",
                     "images/img003.png": "a green thing, canny of img003"}


def test_same_stem_different_extensions_do_not_overwrite_each_other(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    photo(40, 40, 1).save(images / "x.png")
    photo(40, 40, 2).save(images / "x.jpg")
    run(images, tmp_path / "out", "--condition", "canny", "--resolution", "32", "--num_proc", "1")
    names = [json.loads(line)["file_name"] for line in (tmp_path / "out/metadata.jsonl").read_text().splitlines()]
    assert names == ["images/x_jpg.png", "images/x_png.png"]


def test_resuming_with_other_settings_needs_overwrite(tmp_path):
    images = tmp_path / "photos"
    write_photos(images, 3)
    run(images, tmp_path / "out", "--condition", "canny", "--resolution", "32", "--num_proc", "1")
    with pytest.raises(UserError, match=r"other settings \(resolution\); pass --overwrite"):
        run(images, tmp_path / "out", "--condition", "canny", "--resolution", "40", "--num_proc", "1")
    report = run(images, tmp_path / "out", "--condition", "canny", "--resolution", "40", "--overwrite",
                 "--num_proc", "1")
    assert report["counts"]["resumed"] == 0 and min(Image.open(tmp_path / "out/images/img002.png").size) == 40
    (tmp_path / "other").mkdir()
    (tmp_path / "other/keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and was not written by zeroconv prepare"):
        run(images, tmp_path / "other", "--condition", "canny", "--num_proc", "1")


def test_user_mistakes_are_one_line_errors(tmp_path):
    images = tmp_path / "photos"
    write_photos(images, 1)
    with pytest.raises(UserError, match="--images .*: no such folder"):
        run(tmp_path / "nope", tmp_path / "out", "--condition", "canny")
    with pytest.raises(UserError, match="unknown condition"):
        run(images, tmp_path / "out", "--condition", "canyn")
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        run(images, tmp_path / "out", "--condition", "canny", "--condition_options", "low")
    with pytest.raises(UserError, match="multiple of 8"):
        run(images, tmp_path / "out", "--condition", "canny", "--resolution", "30")
    with pytest.raises(UserError, match="unknown field"):
        run(images, tmp_path / "out", "--condition", "canny", "--caption_template", "{title}")


def test_facesynthetics_landmarks_are_drawn_at_the_resized_coordinates(tmp_path):
    images = tmp_path / "faces"
    images.mkdir()
    points = face_landmarks(256)
    for i in range(3):
        photo(256, 256, seed=i).save(images / f"{i:06d}.png")
        write_ldmks(images / f"{i:06d}_ldmks.txt", points)
    (images / "000002_ldmks.txt").write_text("garbage\n")
    report = run(images, tmp_path / "out", "--condition", "landmarks", "--resolution", "128", "--num_proc", "1")
    assert [s["file"] for s in report["skipped"]] == ["000002.png"]
    assert "unreadable landmark annotation 000002_ldmks.txt" in report["skipped"][0]["reason"]
    mask = np.asarray(Image.open(tmp_path / "out/conditioning_images/000000.png"))
    for index, (x, y) in enumerate(np.round(points / 2).astype(int)):
        assert tuple(mask[y, x]) == COLORS[region_of(index)], index


def test_zeroconv_train_reads_the_prepared_folder_with_no_column_flags(tmp_path, tiny_base):
    from tests.train.helpers import run_training, tiny_config
    from zeroconv.data.sources import load_examples

    images = tmp_path / "photos"
    write_photos(images, 6, size=(72, 64))
    (images / "img001.txt").write_text("a red circle")
    out = tmp_path / "data"
    run(images, out, "--condition", "canny", "--resolution", "64", "--num_proc", "1")
    cfg = tiny_config(tiny_base, None, tmp_path / "run", train_data_dir=None, dataset_name=str(out),
                      max_train_steps=2, train_batch_size=2)
    examples = load_examples(cfg)
    assert len(examples) == 6 and examples[0].conditioning_image is not None
    assert run_training(cfg) == 0
    assert (tmp_path / "run" / "diffusion_pytorch_model.safetensors").is_file() or any(
        (tmp_path / "run").rglob("diffusion_pytorch_model.safetensors"))


def test_empty_captions_get_one_notice_naming_the_options_and_the_summary_counts_sources(tmp_path, caplog,
                                                                                       capsys):
    images = tmp_path / "photos"
    write_photos(images, 3)
    caplog.set_level(logging.WARNING, logger="zeroconv.prepare")
    assert main(["--images", str(images), "--condition", "canny", "--out", str(tmp_path / "bare"), "--resolution",
                 "32", "--num_proc", "1"]) == 0
    notices = [r.getMessage() for r in caplog.records if r.name == "zeroconv.prepare"]
    assert len(notices) == 1 and notices[0].startswith("3 of 3 images have no caption")
    for flag in ("--caption_model", "--caption_template", "photo.txt", "--caption_file"):
        assert flag in notices[0]
    assert "captions: 3 empty;" in capsys.readouterr().out

    # one image with a sidecar: the notice counts the other two
    (images / "nested/img001.txt").write_text("a cat")
    caplog.clear()
    report = run(images, tmp_path / "partly", "--condition", "canny", "--resolution", "32", "--num_proc", "1")
    assert [r.getMessage()[:30] for r in caplog.records] == ["2 of 3 images have no caption:"]
    assert report["counts"]["captions_by_source"] == {"empty": 2, "sidecar": 1}
    assert "captions: 1 sidecar, 2 empty;" in report["summary"]

    # every image captioned by some source: no notice
    mapping = tmp_path / "captions.csv"
    mapping.write_text("file_name,text\nnested/deeper/img000.png,a dog\nimg002.webp,a bird\n")
    for out, flags in (("mapped", ["--caption_file", str(mapping)]),
                       ("templated", ["--caption_template", "a photo of {stem}"])):
        caplog.clear()
        report = run(images, tmp_path / out, "--condition", "canny", "--resolution", "32", "--num_proc", "1", *flags)
        assert not [r for r in caplog.records if r.name == "zeroconv.prepare"], out
        assert "empty" not in report["counts"]["captions_by_source"], out
    assert report["counts"]["captions_by_source"] == {"sidecar": 1, "template": 2}
