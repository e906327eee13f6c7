"""`zeroconv prepare`: a folder of photos -> a ControlNet training dataset (image, conditioning image, caption).

    zeroconv prepare --images photos/ --condition canny --out data/ --resolution 512 --num_proc 8

writes, in the imagefolder layout that `zeroconv train --dataset_name data/` reads with no column flags:

    data/images/<relative path>.png               the photo, EXIF rotation applied, RGB, shorter side resized
    data/conditioning_images/<relative path>.png  its condition, same size
    data/metadata.jsonl                           {"file_name", "conditioning_image_file_name", "text"} per row
    data/preview.png                              the first examples: image | condition pairs
    data/report.json                              counts, every skipped file with its reason, conversions,
                                                  timings, settings

and with --format webdataset also tar shards of --shard_size samples and their index, which `zeroconv train
--train_data_dir data/` streams (zeroconv.data.shards, zeroconv.data.stream):

    data/shard-000000.tar ...                     image, conditioning image and caption of each sample
    data/shards.json                              shard names and sample counts, written last

How it stays correct on a night's run:
- Bad input never aborts it (unless --strict): empty, truncated or corrupt files, non-images with an image
  extension, images smaller than --resolution (or upscaled with --upscale_small), unreadable annotations are
  skipped with their reason; CMYK, 16-bit, LA, P, RGBA (composited on white) images are converted.
- Deterministic: image i's randomness (random canny thresholds, scribble widths, masks) comes from a generator
  seeded by (--seed, its relative path), never from the order or the process that handles it.
- Resumable: each finished image is recorded by its own small file in data/.prepare/items/, written after its
  images and atomically renamed into place; metadata.jsonl is assembled from those records in sorted order at
  the end. A killed run run again skips the recorded images and ends with the same dataset as an uninterrupted
  run. Skipped files are retried on every run (a fixed file gets in).
- Captions from a model run after the conditions, in batches, in the main process (one model in memory), and are
  recorded the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zeroconv.config import option, parse, to_dict
from zeroconv.data.captions import (CAPTION_SOURCES, CaptionLookup, check_template, empty_captions_notice,
                                    fill_template, read_caption_file, text_source)
from zeroconv.data.conditions import EXTRACTORS, BadInput, get_extractor, parse_options
from zeroconv.data.shards import DEFAULT_SHARD_SIZE
from zeroconv.data.transforms import normalize
from zeroconv.errors import UserError

logger = logging.getLogger("zeroconv.prepare")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
IMAGE_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
STATE_DIR = ".prepare"
# Settings that do not change the dataset; a resumed run may change them freely. The shards are rebuilt from the
# per-image records on every run, so --format and --shard_size are among them.
RUN_ONLY_SETTINGS = ("num_proc", "strict", "overwrite", "preview", "device", "caption_batch_size", "images", "out",
                     "format", "shard_size")


@dataclass
class PrepareConfig:
    images: str = option(None, "Folder of photos (jpg, png, webp, bmp, tif; nested folders are walked). Required.")
    condition: str = option(None, f"Condition to compute: {', '.join(EXTRACTORS)}. Required.")
    out: str = option(None, "Output folder (the dataset). Re-running into it resumes an interrupted run.")
    condition_options: list[str] = option(
        [], "KEY=VALUE options of the condition, e.g. 'low=50 high=150', 'random_thresholds=true', "
        "'model=Intel/dpt-hybrid-midas' (depth/segmentation: local folder or hub id), "
        "'annotations_dir=DIR' (landmarks). A wrong key lists the accepted ones.", metavar="KEY=VALUE")
    resolution: int = option(512, "Resize each image so its shorter side is this many pixels (aspect kept; training "
                             "crops). Smaller images are skipped unless --upscale_small. 0 keeps every size.")
    upscale_small: bool = option(False, "Upscale images smaller than --resolution instead of skipping them.")
    image_format: str = option("png", "File format of the target images (conditions are always PNG): png "
                               "(lossless), jpg or webp (quality 95, about 10x smaller).", choices=list(IMAGE_FORMATS))
    sidecar_captions: bool = option(True, "Read captions from photo.txt / photo.caption beside each photo.")
    caption_file: str | None = option(None, "CSV or JSONL mapping file -> caption (columns file_name/image/file and "
                                      "text/caption/prompt; file names relative to --images).")
    caption_model: str | None = option(
        None, "Image-to-text model (local folder or hub id, e.g. Salesforce/blip-image-captioning-large) "
        "captioning every image that has no sidecar or mapping caption.")
    caption_prompt: str = option("", "Text the captioner continues (BLIP conditional captioning, e.g. 'a photo of').")
    caption_template: str | None = option(
        None, "Final caption template, fields {caption} {stem} {folder} {condition}, e.g. "
        "'a photo of a face, {caption}'. Without it the caption is used as is ('' if none).")
    caption_batch_size: int = option(8, "Images per batch of the caption model.")
    caption_max_new_tokens: int = option(30, "Longest caption the model may write, in tokens.")
    device: str = option("", "Device for model-based conditions and captions (cuda, cpu); default cuda if present.")
    num_proc: int = option(0, "Worker processes computing conditions; 0 uses every CPU core.")
    seed: int = option(0, "Seed of the random parts of conditions; with the same seed and inputs, the same dataset.")
    strict: bool = option(False, "Stop at the first bad file instead of skipping it.")
    preview: int = option(16, "Examples shown in preview.png (0: no preview).")
    overwrite: bool = option(False, "Start afresh in an --out folder prepared with other settings.")
    format: str = option(
        "folder", "Layout of the dataset. folder: images/, conditioning_images/ and metadata.jsonl (the imagefolder "
        "layout). webdataset: also tar shards of --shard_size samples (image, conditioning image, caption each) and "
        "their index shards.json, which `zeroconv train --train_data_dir OUT` streams with a shuffle buffer (for "
        "datasets larger than a disk: copy or serve only the .tar files and shards.json).",
        choices=["folder", "webdataset"])
    shard_size: int = option(DEFAULT_SHARD_SIZE, "--format webdataset: samples per tar shard (the last one holds the "
                             "rest). Streaming splits shards across processes and loader workers, so keep several "
                             "shards per worker: shards >= processes x --dataloader_num_workers.")


# ---------------------------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------------------------

class Skip(Exception):
    """A bad input file: `kind` is a short category for the summary, the message the reason for the report."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")


def has_image_signature(path: Path) -> bool:
    """Whether the file starts like an image file (so an undecodable one is corrupt, not something else)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return head.startswith(SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def load_photo(path: Path) -> tuple[Image.Image, list[str]]:
    """The photo as upright 8-bit RGB and the conversions applied; Skip for anything that is not a usable image."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise Skip("unreadable", f"unreadable file ({exc.strerror or type(exc).__name__})") from None
    if size == 0:
        raise Skip("empty", "empty file (0 bytes)")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here
            image, notes = normalize(opened)
            if image is opened:  # already upright RGB: a copy outlives the closed file
                image = opened.copy()
    except UnidentifiedImageError:
        if has_image_signature(path):
            raise Skip("corrupt", "corrupt image (its header is unreadable)") from None
        raise Skip("not_image", "not an image (unrecognized file format)") from None
    except Image.DecompressionBombError as exc:
        raise Skip("too_large", f"too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise Skip("corrupt", f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    return image, notes


def fit_resolution(image: Image.Image, resolution: int, upscale_small: bool) -> tuple[Image.Image, str | None]:
    """Shorter side resized to `resolution` (aspect kept); Skip for smaller images unless `upscale_small`."""
    width, height = image.size
    short = min(width, height)
    if not resolution or short == resolution:
        return image, None
    note = None
    if short < resolution:
        if not upscale_small:
            raise Skip("too_small", f"smaller than --resolution {resolution} ({width}x{height}); pass "
                       "--upscale_small to upscale it")
        note = f"upscaled from {width}x{height}"
    scale = resolution / short
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return Image.fromarray(cv2.resize(np.asarray(image), size, interpolation=interpolation)), note


def item_rng(seed: int, relative: str) -> np.random.Generator:
    """The generator of one image: a function of the seed and the image's relative path only."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, int.from_bytes(digest[:8], "little")])


def write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write `data` so `path` either does not exist or holds all of it, even if the process is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{os.getpid()}-{path.name}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def encode(array: np.ndarray, suffix: str) -> bytes:
    if array.ndim == 3 and array.shape[2] == 4:
        bgr = cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
    else:
        bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, 95], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 95]}.get(suffix, [])
    ok, buffer = cv2.imencode(suffix, bgr, params)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array of these shapes
        raise RuntimeError(f"cannot encode {suffix}")
    return buffer.tobytes()


@dataclass
class Task:
    relative: str  # path under --images, posix
    file_name: str  # images/...
    conditioning_file_name: str  # conditioning_images/...


class Worker:
    """Everything one process needs to prepare images; built once per process."""

    def __init__(self, cfg: PrepareConfig, lookup: CaptionLookup):
        self.cfg, self.lookup = cfg, lookup
        self.root, self.out = Path(cfg.images), Path(cfg.out)
        self.extractor = get_extractor(cfg.condition, seed=cfg.seed, **parse_condition_options(cfg))
        self.tmp = self.out / STATE_DIR / "tmp"

    def prepare(self, task: Task) -> dict:
        """Prepare one image and record it; returns the record. Never raises for bad input."""
        path = self.root / task.relative
        record: dict = {"source": task.relative}
        try:
            image, notes = load_photo(path)
            image, note = fit_resolution(image, self.cfg.resolution, self.cfg.upscale_small)
            notes += [note] if note else []
            try:
                condition = self.extractor(image, rng=item_rng(self.cfg.seed, task.relative), path=path)
            except BadInput as exc:
                raise Skip("annotation", str(exc)) from None
            except UserError:
                raise
            except Exception as exc:  # an extractor failing on one odd image must not end the run
                raise Skip("condition_error", f"the {self.cfg.condition} condition failed ({type(exc).__name__}: "
                           f"{exc})") from None
            image_suffix = Path(task.file_name).suffix
            write_atomic(self.out / task.file_name, encode(np.asarray(image), image_suffix), self.tmp)
            write_atomic(self.out / task.conditioning_file_name, encode(np.asarray(condition), ".png"), self.tmp)
            caption, caption_source = self.lookup(path, task.relative)
            record.update(status="ok", file_name=task.file_name,
                          conditioning_image_file_name=task.conditioning_file_name, caption=caption,
                          caption_source=caption_source, size=list(image.size), notes=notes)
        except Skip as skip:
            record.update(status="skipped", kind=skip.kind, reason=str(skip))
        record["stamp"] = source_stamp(path)
        write_record(self.out, task.relative, record, self.tmp)
        return record


_worker: Worker | None = None


def _init_worker(cfg: PrepareConfig, lookup: CaptionLookup) -> None:
    global _worker
    cv2.setNumThreads(1)  # parallelism comes from processes; threads per process would fight over the cores
    _worker = Worker(cfg, lookup)


def _prepare_in_worker(task: Task) -> dict:
    return _worker.prepare(task)


# ---------------------------------------------------------------------------------------------------------------
# Records (the resumable state)
# ---------------------------------------------------------------------------------------------------------------

def record_path(out: Path, relative: str) -> Path:
    digest = hashlib.sha1(relative.encode("utf-8")).hexdigest()
    return out / STATE_DIR / "items" / digest[:2] / f"{digest}.json"


def write_record(out: Path, relative: str, record: dict, tmp: Path) -> None:
    write_atomic(record_path(out, relative), json.dumps(record, sort_keys=True).encode("utf-8"), tmp)


def read_record(out: Path, relative: str) -> dict | None:
    try:
        return json.loads(record_path(out, relative).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def source_stamp(path: Path) -> list[int] | None:
    """(size, mtime) of the source: a record of a file changed since is redone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def is_done(record: dict | None, root: Path) -> bool:
    return bool(record) and record.get("status") == "ok" and record.get("stamp") == source_stamp(
        root / record["source"])


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def parse_condition_options(cfg: PrepareConfig) -> dict:
    options = parse_options(cfg.condition_options, "--condition_options")
    if cfg.device and cfg.condition in ("depth", "segmentation"):
        options.setdefault("device", cfg.device)
    return options


def find_images(root: Path, exclude: Path | None = None) -> list[str]:
    """Relative posix paths of the image files under `root`, sorted; hidden folders and `exclude` left out."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or (Path(folder) / d).resolve() != exclude))
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def plan_tasks(relatives: list[str], image_suffix: str) -> list[Task]:
    """Output names: the relative path with the new suffix; photos sharing a stem (x.jpg, x.png) keep their
    extension in the name (x_jpg, x_png) so neither overwrites the other."""
    stems = Counter(Path(r).with_suffix("").as_posix().lower() for r in relatives)
    tasks = []
    for relative in relatives:
        stem = Path(relative).with_suffix("").as_posix()
        if stems[stem.lower()] > 1:
            stem = f"{stem}_{Path(relative).suffix[1:].lower()}"
        tasks.append(Task(relative, f"images/{stem}{image_suffix}", f"conditioning_images/{stem}.png"))
    return tasks


def dataset_settings(cfg: PrepareConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY_SETTINGS}


def open_out(cfg: PrepareConfig) -> Path:
    """Create --out, or check it may be resumed: same dataset settings as the run that started it."""
    out = Path(cfg.out)
    state = out / STATE_DIR
    settings_file = state / "settings.json"
    settings = dataset_settings(cfg)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; pass a folder")
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text())
        if previous != settings and not cfg.overwrite:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise UserError(f"--out {out}: prepared before with other settings ({', '.join(changed)}); pass "
                            "--overwrite to start afresh, or use another folder")
        if previous != settings:
            for name in (STATE_DIR, "images", "conditioning_images"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in ("metadata.jsonl", "report.json", "preview.png"):
                (out / name).unlink(missing_ok=True)
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: folder is not empty and was not written by zeroconv prepare; pick an empty "
                        "or new folder")
    try:
        (state / "items").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror})") from None
    shutil.rmtree(state / "tmp", ignore_errors=True)  # halves of files a killed run was writing
    (state / "tmp").mkdir()
    settings_file.write_text(json.dumps(settings, indent=1, sort_keys=True))
    return out


def check_config(cfg: PrepareConfig) -> None:
    for flag in ("images", "condition", "out"):
        if not getattr(cfg, flag):
            raise UserError(f"--{flag} is required")
    if not Path(cfg.images).is_dir():
        raise UserError(f"--images {cfg.images}: no such folder")
    if cfg.resolution < 0 or cfg.resolution % 8:
        raise UserError(f"--resolution {cfg.resolution}: must be 0 or a multiple of 8 (training needs it); try "
                        f"{max(8, cfg.resolution // 8 * 8)}")
    if cfg.caption_batch_size < 1:
        raise UserError("--caption_batch_size must be at least 1")
    if cfg.caption_template:
        check_template(cfg.caption_template)
    if cfg.shard_size < 1:
        raise UserError(f"--shard_size {cfg.shard_size}: must be at least 1 (samples per tar shard)")
    get_extractor(cfg.condition, seed=cfg.seed, **parse_condition_options(cfg))  # names and options fail here


def start_method(condition: str) -> str:
    """fork where it is safe and available: workers start at once, with the modules already loaded. Model-based
    conditions run torch in the workers, and torch's thread pools do not survive a fork: those spawn clean."""
    import multiprocessing

    model_based = EXTRACTORS[condition].startswith("zeroconv.data.conditions.models:")
    return "fork" if not model_based and "fork" in multiprocessing.get_all_start_methods() else "spawn"


def run_conditions(cfg: PrepareConfig, tasks: list[Task], lookup: CaptionLookup, done: int, total: int,
                   strict: bool) -> None:
    import contextlib

    from tqdm.auto import tqdm

    workers = cfg.num_proc or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    with contextlib.ExitStack() as stack:
        if workers > 1:
            import multiprocessing

            context = multiprocessing.get_context(start_method(cfg.condition))
            # the pool starts before the progress bar's monitor thread exists: nothing to fork but this thread
            pool = stack.enter_context(context.Pool(workers, initializer=_init_worker, initargs=(cfg, lookup)))
            chunk = max(1, min(16, len(tasks) // (workers * 8)))
            records = pool.imap_unordered(_prepare_in_worker, tasks, chunksize=chunk)
        else:
            previous = cv2.getNumThreads()
            stack.callback(cv2.setNumThreads, previous)
            _init_worker(cfg, lookup)
            records = (_worker.prepare(task) for task in tasks)
        bar = stack.enter_context(tqdm(total=total, initial=done, desc=f"prepare {cfg.condition}", unit="img",
                                       dynamic_ncols=True))
        for record in records:
            bar.update(1)
            if strict and record["status"] == "skipped":
                raise UserError(f"{Path(cfg.images) / record['source']}: {record['reason']} (--strict stops at the "
                                "first bad file; fix or remove it, or drop --strict to skip bad files)")


def run_captioner(cfg: PrepareConfig, out: Path, records: dict[str, dict]) -> int:
    """Caption with the model every prepared image that found no caption; returns how many it captioned."""
    pending = [r for r in records.values() if r.get("status") == "ok" and r.get("caption") is None]
    if not cfg.caption_model or not pending:
        return 0
    from tqdm.auto import tqdm

    from zeroconv.data.captions import ModelCaptioner

    captioner = ModelCaptioner(cfg.caption_model, prompt=cfg.caption_prompt,
                               max_new_tokens=cfg.caption_max_new_tokens, device=cfg.device)
    tmp = out / STATE_DIR / "tmp"
    with tqdm(total=len(pending), desc="captions", unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(pending), cfg.caption_batch_size):
            batch = pending[start:start + cfg.caption_batch_size]
            images = []
            for record in batch:
                with Image.open(out / record["file_name"]) as im:
                    images.append(im.convert("RGB"))
            for record, caption in zip(batch, captioner(images)):
                record.update(caption=caption, caption_source="model")
                write_record(out, record["source"], record, tmp)
            bar.update(len(batch))
    return len(pending)


def write_webdataset(out: Path, rows: list[dict], shard_size: int) -> int:
    """The rows as tar shards of `shard_size` samples and their index (zeroconv.data.shards); returns the shard
    count. 0 (--format folder): none, and those of an earlier --format webdataset run are removed.

    The index goes first and comes back last, and a marker stands in between: a run killed while writing shards
    leaves no shards.json, so no trainer reads a half-written set (it names the fix: run prepare again). The shards are rebuilt from the
    per-image records on every run (a copy of files already encoded), so a resumed prepare needs no shard state."""
    from zeroconv.data import shards

    (out / shards.INDEX).unlink(missing_ok=True)
    (out / shards.UNFINISHED).unlink(missing_ok=True)  # --format folder: no shards to finish
    chunks = [rows[start:start + shard_size] for start in range(0, len(rows), shard_size)] if shard_size else []
    names = {shards.shard_name(number) for number in range(len(chunks))}
    for stale in out.glob("shard-*.tar"):  # of an earlier run with more rows, smaller shards or another --format
        if stale.name not in names:
            stale.unlink()
    if not chunks:
        return 0
    from tqdm.auto import tqdm

    tmp = out / STATE_DIR / "tmp"
    (out / shards.UNFINISHED).touch()
    written = []
    with tqdm(total=len(rows), desc="shards", unit="img", dynamic_ncols=True) as bar:
        for number, chunk in enumerate(chunks):
            first = number * shard_size

            def samples(chunk=chunk, first=first):
                for offset, row in enumerate(chunk):
                    image = Path(row["file_name"])
                    yield {"__key__": f"{first + offset:09d}",
                           f"{shards.IMAGE}{image.suffix}": (out / image).read_bytes(),
                           shards.CONDITION: (out / row["conditioning_image_file_name"]).read_bytes(),
                           shards.CAPTION: row["text"].encode("utf-8")}
                    bar.update(1)

            name = shards.shard_name(number)
            written.append(shards.Shard(name, shards.write_shard(out / name, samples(), tmp), first))
    shards.write_index(out, written, tmp)
    return len(written)


def write_preview(out: Path, rows: list[dict], count: int, thumb: int = 128) -> None:
    rows = rows[:count]
    if not rows:
        return
    columns = min(4, len(rows))
    lines = (len(rows) + columns - 1) // columns
    grid = Image.new("RGB", (columns * 2 * thumb, lines * thumb), (255, 255, 255))
    for i, row in enumerate(rows):
        x, y = (i % columns) * 2 * thumb, (i // columns) * thumb
        for j, key in enumerate(("file_name", "conditioning_image_file_name")):
            with Image.open(out / row[key]) as im:
                tile = ImageOps.pad(im.convert("RGB"), (thumb, thumb), color=(255, 255, 255))
            grid.paste(tile, (x + j * thumb, y))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_atomic(out / "preview.png", buffer.getvalue(), out / STATE_DIR / "tmp")


def count_empty_captions(cfg: PrepareConfig, lookup: CaptionLookup, tasks: list[Task]) -> int:
    """How many of the images will get an empty text: no sidecar or mapping caption, no --caption_model to write
    one, no words of a --caption_template. Counted before the run (a lookup is a file check), so the notice
    comes before the wait, not after it."""
    if cfg.caption_model:
        return 0
    root = Path(cfg.images)
    return sum(1 for task in tasks
               if not fill_template(cfg.caption_template, lookup(root / task.relative, task.relative)[0],
                                    task.relative, cfg.condition))


def summarize(found: int, rows: int, skipped: list[dict], captions: dict[str, int], out: Path,
              seconds: float) -> str:
    kinds = Counter(r["kind"] for r in skipped)
    detail = f" ({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))})" if kinds else ""
    by_source = ", ".join(f"{captions[source]} {source}" for source in CAPTION_SOURCES if captions.get(source))
    return (f"prepared {rows} of {found} images, {len(skipped)} skipped{detail} -> {out} in {seconds:.1f} s "
            f"({found / max(seconds, 1e-9):.1f} images/s); captions: {by_source or 'none'}; "
            f"report: {out / 'report.json'}")


def prepare(cfg: PrepareConfig) -> dict:
    """Run `zeroconv prepare`; returns the report (also written to OUT/report.json)."""
    started = time.perf_counter()
    check_config(cfg)
    out = open_out(cfg)
    root = Path(cfg.images)
    mapping = read_caption_file(cfg.caption_file) if cfg.caption_file else None
    lookup = CaptionLookup(mapping, sidecars=cfg.sidecar_captions)
    relatives = find_images(root, exclude=out.resolve())
    if not relatives:
        raise UserError(f"--images {root}: no {', '.join(s[1:] for s in IMAGE_SUFFIXES)} files found (nested "
                        "folders included)")
    tasks = plan_tasks(relatives, IMAGE_FORMATS[cfg.image_format])
    records = {t.relative: read_record(out, t.relative) for t in tasks}
    todo = [t for t in tasks if not is_done(records[t.relative], root)]
    resumed = len(tasks) - len(todo)
    empty = count_empty_captions(cfg, lookup, tasks)
    if empty:
        logger.warning(empty_captions_notice(empty, len(tasks), cfg.sidecar_captions))
    scanned = time.perf_counter()

    run_conditions(cfg, todo, lookup, resumed, len(tasks), cfg.strict)
    conditioned = time.perf_counter()
    records = {t.relative: read_record(out, t.relative) for t in tasks}
    captioned_by_model = run_captioner(cfg, out, records)
    captioned = time.perf_counter()

    rows, skipped, converted, sources = [], [], [], Counter()
    for task in tasks:  # sorted by relative path: the row order does not depend on the run's history
        record = records[task.relative]
        if record is None:  # pragma: no cover - every task was recorded above
            raise RuntimeError(f"no record for {task.relative}")
        if record["status"] != "ok":
            skipped.append({"file": task.relative, "kind": record["kind"], "reason": record["reason"]})
            continue
        text = fill_template(cfg.caption_template, record["caption"], task.relative, cfg.condition)
        sources[text_source(text, record.get("caption_source"))] += 1
        rows.append({"file_name": record["file_name"],
                     "conditioning_image_file_name": record["conditioning_image_file_name"], "text": text})
        if record["notes"]:
            converted.append({"file": task.relative, "notes": record["notes"]})
    metadata = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    write_atomic(out / "metadata.jsonl", metadata, out / STATE_DIR / "tmp")
    shard_count = write_webdataset(out, rows, cfg.shard_size if cfg.format == "webdataset" else 0)
    if cfg.preview:
        write_preview(out, rows, cfg.preview)
    finished = time.perf_counter()

    report = {
        "summary": summarize(len(tasks), len(rows), skipped, sources, out, finished - started),
        "counts": {
            "found": len(tasks), "prepared": len(rows), "skipped": len(skipped),
            "skipped_by_kind": dict(sorted(Counter(s["kind"] for s in skipped).items())),
            "converted": len(converted), "resumed": resumed, "prepared_this_run": len(todo),
            "captions_by_source": dict(sorted(sources.items())), "captioned_by_model_this_run": captioned_by_model,
            **({"shards": shard_count} if cfg.format == "webdataset" else {}),
        },
        "skipped": skipped,
        "converted": converted,
        "timings": {
            "scan_s": round(scanned - started, 3), "conditions_s": round(conditioned - scanned, 3),
            "captions_s": round(captioned - conditioned, 3), "assemble_s": round(finished - captioned, 3),
            "total_s": round(finished - started, 3),
            "conditions_images_per_s": round(len(todo) / max(conditioned - scanned, 1e-9), 2),
        },
        "settings": to_dict(cfg),
    }
    write_atomic(out / "report.json", json.dumps(report, indent=1).encode("utf-8"), out / STATE_DIR / "tmp")
    return report


def main(argv: list[str] | None = None) -> int:
    cfg = parse(PrepareConfig, argv, prog="zeroconv prepare",
                description="Photos -> training dataset: compute each image's condition and caption, in parallel, "
                "resumably; bad files are skipped and listed in OUT/report.json.")
    # zeroconv's warnings (the empty-captions notice) as `zeroconv train` shows them, on stderr beside the progress
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    report = prepare(cfg)
    print(report["summary"])
    return 0
