"""Where training triples come from: (target image, conditioning image, caption) rows of any supported source.

`load_examples(cfg)` detects the source from --train_data_dir or --dataset_name and returns `Examples`, a
sequence of `Example`s whose images are only decoded when asked for (`example.open_image()`), so listing 50k
rows costs a metadata read, not 100k image decodes. Sources:

- imagefolder layout (diffusers' `train_data_dir`): metadata.jsonl (or .csv) with file_name,
  conditioning_image_file_name and text. As in `datasets`' imagefolder, `file_name` is the column `image` and
  `X_file_name` the column `X`, so --image_column/--conditioning_image_column/--caption_column mean the same
  here as with diffusers' script. `zeroconv prepare` writes this layout.
- Fill50K layout: prompt.json lines {"source", "target", "prompt"} with source/ and target/ folders.
- kohya pair: images/ and conditioning/ matched by file stem, caption in images/<stem>.txt or .caption.
- `datasets`: a save_to_disk folder (load_from_disk), or anything `datasets.load_dataset` reads (hub id,
  local script, data folder).
- webdataset shards of `zeroconv prepare --format webdataset` (a folder with shards.json): `ShardExamples`, which
  zeroconv.data.stream streams; they have a length and no random access. The one source a URL may name
  (`--train_data_dir s3://...`, `hf://...`: the folder read through fsspec, zeroconv.data.shards).
- `--dataset_name X --streaming`: the parquet files of X's train split (zeroconv.data.datafiles), listed by
  datasets' builder and counted from their footers, nothing downloaded; `ShardExamples` too, streamed alike.

`check_data_args(cfg)` runs every check possible before a model loads; each failure is a one-line UserError.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from zeroconv.config import check_train_config, union_columns
from zeroconv.data.datafiles import DataFileIndex, caption_value, data_file_index, read_footers
from zeroconv.data.shards import ShardIndex, is_shard_folder, is_unfinished, is_url, read_index
from zeroconv.errors import UserError
from zeroconv.jsonl import read_rows

logger = logging.getLogger("zeroconv.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# A path, a PIL image, raw bytes, or a `datasets` image value ({"bytes", "path"}).
ImageSource = Any


def open_image(source: ImageSource) -> Image.Image:
    """Decode an image source fully, so a truncated or corrupt file fails here and not later in a transform."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        image = Image.open(source)
    elif isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, dict):
        import datasets

        # datasets' own decoder: it also reads hub-relative paths of not-yet-downloaded files
        return datasets.Image().decode_example(source)
    else:
        raise ValueError(f"not an image: {type(source).__name__}")
    image.load()
    return image


def source_label(source: ImageSource) -> str | None:
    """The file behind an image source, for messages; None for in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return None


@dataclass(frozen=True)
class Example:
    """One training row. `image`/`conditioning_image` are sources, decoded by `open_image()`.

    conditioning_image is None when the condition is computed from the image (--condition). A union ControlNet's
    row has one condition per type instead, `conditioning_images` (--conditioning_image_columns' order)."""

    image: ImageSource
    conditioning_image: ImageSource | None
    caption: str | list[str]
    name: str
    conditioning_images: tuple[ImageSource, ...] | None = None

    def open_image(self) -> Image.Image:
        return open_image(self.image)

    def open_conditioning_image(self) -> Image.Image | None:
        return None if self.conditioning_image is None else open_image(self.conditioning_image)


class Examples(Sequence):
    """The rows of a source: `len()`, `examples[i] -> Example`, `fingerprint()`, `description`."""

    description: str = ""

    def fingerprint(self) -> str:
        """A stable hash of what the rows are (files and their sizes/mtimes, or the `datasets` fingerprint),
        the columns read and max_train_samples: a latent cache keyed by it goes stale when the data changes."""
        raise NotImplementedError


class FileExamples(Examples):
    """Rows listed from a local layout: (image path, conditioning path or None, caption, name)."""

    def __init__(self, rows: list[Example], identity: dict, description: str):
        self.rows, self.identity, self.description = rows, identity, description

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        return self.rows[index]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        for row in self.rows:
            for path in (row.image, row.conditioning_image, *(row.conditioning_images or ())):
                if path is None:
                    digest.update(b"-")
                    continue
                stat = os.stat(path)
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            digest.update(json.dumps(row.caption).encode())
        return digest.hexdigest()[:32]


class DatasetExamples(Examples):
    """Rows of a `datasets.Dataset`; image columns are read undecoded and decoded on `open_image()`."""

    def __init__(self, dataset, image_column: str, conditioning_column: str | None, caption_column: str,
                 identity: dict, description: str, union_columns: list[str] | None = None):
        import datasets

        union_columns = union_columns or []
        for column in (image_column, conditioning_column, *union_columns):
            if column is not None and isinstance(dataset.features[column], datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([c for c in (image_column, conditioning_column, *union_columns,
                                                           caption_column) if c])
        self.image_column, self.conditioning_column, self.caption_column = image_column, conditioning_column, \
            caption_column
        self.union_columns = union_columns
        self.identity, self.description = identity, description

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Example:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        row = self.dataset[index]
        cond = row[self.conditioning_column] if self.conditioning_column else None
        union = tuple(row[column] for column in self.union_columns) or None
        return Example(row[self.image_column], cond, caption_value(row[self.caption_column]), f"row {index}", union)

    def fingerprint(self) -> str:
        identity = dict(self.identity, dataset_fingerprint=self.dataset._fingerprint)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------
# Checks and entry points
# ----------------------------------------------------------------------------------------------------------------

def check_data_args(cfg) -> Examples:
    """Every data check possible before a model loads: flags, paths, columns, missing files, validation pairs;
    returns the opened examples, so nothing opens the source a second time."""
    check_train_config(cfg)
    return open_source(cfg)


def load_examples(cfg) -> Examples:
    """The training rows named by cfg (a TrainConfig), first `max_train_samples` of them."""
    check_train_config(cfg)
    return open_examples(cfg)


def open_examples(cfg) -> Examples:
    """load_examples for a config whose fields are already checked (zeroconv.train.preflight)."""
    examples = open_source(cfg)
    logger.info("training data: %s, %d examples", examples.description, len(examples))
    return examples


def open_source(cfg) -> Examples:
    if cfg.streaming:  # check_train_config: with --dataset_name only
        return open_streamed_dataset(cfg)
    if cfg.jsonl_for_train:
        return open_jsonl(Path(cfg.jsonl_for_train), cfg)
    if cfg.train_data_dir and is_url(cfg.train_data_dir):
        examples = open_remote_shards(cfg.train_data_dir.rstrip("/"), cfg)
    elif cfg.train_data_dir:
        folder = Path(cfg.train_data_dir)
        if not folder.is_dir():
            raise UserError(f"--train_data_dir {folder}: no such folder")
        examples = open_local_folder(folder.resolve(), cfg, "--train_data_dir")
    else:
        folder = Path(cfg.dataset_name).expanduser()
        if folder.is_dir():
            examples = open_local_folder(folder.resolve(), cfg, "--dataset_name")
        elif looks_like_path(cfg.dataset_name):
            raise UserError(f"--dataset_name {cfg.dataset_name}: no such folder (a hub id looks like owner/name)")
        else:
            examples = open_hub_dataset(cfg)
    if len(examples) == 0:
        raise UserError(f"{flag_of(cfg)} {cfg.train_data_dir or cfg.dataset_name}: no examples found "
                        f"({examples.description})")
    return examples


def open_jsonl(path: Path, cfg) -> Examples:
    """--jsonl_for_train: datasets' json builder on the file, as the SD3 and Flux scripts load it."""
    import datasets

    where = f"--jsonl_for_train {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), cache_dir=cfg.cache_dir, split="train")
    except (ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: not a JSON-lines file of rows ({first_line}); write one JSON object per line") \
            from None
    examples = from_dataset(dataset, cfg, where, f"JSON lines {path}")
    if len(examples) == 0:
        raise UserError(f"{where}: no rows")
    return examples


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name) or "\\" in name


def flag_of(cfg) -> str:
    if cfg.jsonl_for_train:
        return "--jsonl_for_train"
    return "--train_data_dir" if cfg.train_data_dir else "--dataset_name"


def is_save_to_disk_folder(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def open_local_folder(folder: Path, cfg, flag: str) -> Examples:
    if is_shard_folder(folder):
        return open_shards(folder, cfg, flag)
    if is_unfinished(folder):
        raise UserError(f"{flag} {folder}: no shards.json, the index `zeroconv prepare --format webdataset` writes "
                        "after its last shard: that prepare did not finish; run it again (it resumes)")
    for metadata in [folder / name for name in METADATA_FILES] + [folder / "train" / n for n in METADATA_FILES]:
        if metadata.is_file():
            return read_imagefolder(metadata, cfg)
    if (folder / "prompt.json").is_file():
        return read_fill50k(folder / "prompt.json", cfg)
    if is_save_to_disk_folder(folder):
        return read_saved_dataset(folder, cfg, flag)
    if (folder / "images").is_dir():
        cond_dir = folder / "conditioning"
        if not cond_dir.is_dir() and not cfg.condition:
            raise UserError(f"{flag} {folder}: images/ has no conditioning/ folder beside it; add conditioning/ "
                            "with one image per stem, or compute conditions with --condition")
        return read_kohya(folder / "images", None if cfg.condition else cond_dir, cfg, flag)
    if cfg.condition and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        return read_kohya(folder, None, cfg, flag)  # images with captions beside them, conditions computed
    if cfg.train_data_dir:
        return open_with_load_dataset(str(folder), None, cfg, flag)
    return open_with_load_dataset(str(folder), cfg.dataset_config_name, cfg, flag)


class ShardExamples(Examples):
    """The rows of a webdataset shard set (zeroconv.data.shards) or of a dataset's parquet files
    (zeroconv.data.datafiles), streamed by zeroconv.data.stream: a length, no random access."""

    def __init__(self, index: ShardIndex | DataFileIndex, description: str):
        self.index, self.description = index, description

    def __len__(self) -> int:
        return sum(shard.samples for shard in self.index.shards)

    def __getitem__(self, index: int) -> Example:
        raise TypeError(f"{self.description} is streamed (zeroconv.data.stream): no random access")

    def fingerprint(self) -> str:
        return self.index.fingerprint()


# Why a streamed run with --condition encodes live (zeroconv.train.setup.cache_cannot_serve) and refuses --cache
# on/only (refuse_for_stream).
STREAMED_CONDITION = ("--condition extracts each epoch's conditions from the images, and a streamed run the latent "
                      "cache serves reads no image")


def refuse_for_stream(cfg, where: str, fix: str) -> None:
    """The options a stream cannot serve (they need every sample up front), refused naming `fix`; and --cache
    on/only with --condition, which the latent cache cannot serve from a stream."""
    refused = {"--aspect_buckets": cfg.aspect_buckets is not None,
               "--conditioning_image_columns": bool(union_columns(cfg)),
               "--max_train_samples": cfg.max_train_samples is not None}
    for option, given in refused.items():
        if given:
            raise UserError(f"{option} with {where}: a stream has no random access to every sample up front; drop "
                            f"the option, or {fix}")
    if cfg.condition and cfg.cache in ("on", "only"):
        raise UserError(f"--cache {cfg.cache} with --condition and {where}: {STREAMED_CONDITION}; use --cache auto "
                        "(which streams such a run live) or --cache off, or drop --condition")


def open_shards(folder: Path, cfg, flag: str) -> ShardExamples:
    """A folder of `zeroconv prepare --format webdataset` shards, with the options a stream cannot serve refused."""
    refuse_for_stream(cfg, f"{flag} {folder} (webdataset shards, streamed)",
                      "train from the folder layout (`zeroconv prepare` without --format webdataset)")
    index = read_index(folder, flag)
    return ShardExamples(index, f"webdataset shards {folder} ({len(index.shards)} shards)")


def open_remote_shards(url: str, cfg) -> ShardExamples:
    """A shard folder behind a URL (zeroconv.data.shards.read_index through fsspec): a URL that is not one is
    refused before the options a stream cannot serve are."""
    index = read_index(url, "--train_data_dir")
    refuse_for_stream(cfg, f"--train_data_dir {url} (webdataset shards, streamed)",
                      "train from a local folder layout (`zeroconv prepare` without --format webdataset)")
    return ShardExamples(index, f"webdataset shards {url} ({len(index.shards)} shards)")


def open_streamed_dataset(cfg) -> ShardExamples:
    """--dataset_name X --streaming: the parquet files of X's train split as stream shards, listed and counted
    without reading a row (zeroconv.data.datafiles)."""
    given = Path(cfg.dataset_name).expanduser()
    local = given.exists()
    name = str(given.resolve()) if local else cfg.dataset_name
    where = f"--dataset_name {name} --streaming"
    if local and is_shard_folder(given):
        raise UserError(f"{where}: webdataset shards, which are streamed as --train_data_dir {name} without "
                        "--streaming")
    if local and is_save_to_disk_folder(given):
        raise UserError(f"{where}: a save_to_disk folder, on disk already (arrow files, whose row counts are not in "
                        "a footer); drop --streaming")
    if not local and looks_like_path(cfg.dataset_name):
        raise UserError(f"--dataset_name {cfg.dataset_name}: no such folder (a hub id looks like owner/name)")
    refuse_for_stream(cfg, where, "drop --streaming")
    files = (([name] if name.endswith(".parquet") else []) if local and given.is_file()
             else parquet_files(name, cfg.dataset_config_name, cfg, where))
    if not files:
        raise UserError(f"{where}: not a parquet file; --streaming reads parquet (row counts from its footer): "
                        "drop --streaming")
    counts = read_footers(files, where)
    names = counts[0][1]
    columns = pick_columns(cfg, {c: c for c in names}, names, where)
    index = data_file_index(name, cfg.dataset_config_name, files, counts, columns, where)
    return ShardExamples(index, f"datasets {name}, streamed ({len(index.shards)} parquet files)")


def parquet_files(name: str, config_name: str | None, cfg, where: str) -> list[str]:
    """The data files of the train split as datasets' builder resolves them (hub: `hf://datasets/...@commit/...`
    URLs), in its order; a UserError naming the fix for any other format."""
    import datasets

    with load_errors(where):
        builder = datasets.load_dataset_builder(name, config_name, cache_dir=cfg.cache_dir)
    data_files = builder.config.data_files or {}
    if not data_files:  # HF_HUB_OFFLINE: datasets knows a hub dataset from its cache only, without a file listing
        offline = " (HF_HUB_OFFLINE is set, and streaming needs the hub's file listing)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        raise UserError(f"{where}: datasets lists no data files for it{offline}; stream it online, or drop "
                        "--streaming")
    if builder.name != "parquet":
        raise UserError(f"{where}: {builder.name} files; --streaming reads parquet only, whose footers give the row "
                        "counts an epoch's length and equal steps per process need without reading the data: write "
                        "webdataset shards (`zeroconv prepare --format webdataset`) and pass them as --train_data_dir, "
                        "or drop --streaming")
    if "train" not in data_files:
        raise UserError(f"{where}: no 'train' split; splits are: {', '.join(data_files)}")
    return [str(path) for path in data_files["train"]]


@contextlib.contextmanager
def load_errors(where: str):
    """datasets' loading errors as one-line UserErrors naming the fix."""
    import datasets

    try:
        yield
    except ConnectionError as exc:
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(f"{where}: not in the local cache and HF_HUB_OFFLINE is set; download it once online "
                            "(unset HF_HUB_OFFLINE) or give a local folder") from None
        raise UserError(f"{where}: cannot reach the Hub ({exc})") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(f"{where}: no such dataset on the Hub or on disk; check the id, or pass a local folder "
                        "(imagefolder, Fill50K, kohya or save_to_disk layout)") from None
    except (FileNotFoundError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: cannot load it with datasets ({first_line}); supported local layouts: "
                        "metadata.jsonl, prompt.json (Fill50K), images/ + conditioning/ (kohya), save_to_disk") from None


def identity_of(cfg, layout: str, columns: dict) -> dict:
    return {"layout": layout, "columns": columns, "max_train_samples": cfg.max_train_samples}


def first_n(rows: list, cfg) -> list:
    return rows[: cfg.max_train_samples] if cfg.max_train_samples else rows


def unknown_column(flag_name: str, column: str, available: list[str], where: str, hint: str = "") -> UserError:
    return UserError(f"--{flag_name} {column}: no such column in {where}; columns are: {', '.join(available)}"
                     f"{hint}")


def pick_columns(cfg, columns: dict[str, str], visible: list[str], where: str) -> tuple[str, str | None, str]:
    """The (image, condition, caption) keys that --image_column etc. name; `columns` maps names to keys. The
    condition's is None with --condition (computed from the image)."""

    def key_for(flag_name: str, column: str, hint: str = "") -> str:
        if column not in columns:
            raise unknown_column(flag_name, column, visible, where, hint)
        return columns[column]

    image = key_for("image_column", cfg.image_column)
    cond = None
    if not cfg.condition and not union_columns(cfg):
        cond = key_for("conditioning_image_column", cfg.conditioning_image_column,
                       " (or compute the condition from the image with --condition)")
    return image, cond, key_for("caption_column", cfg.caption_column)


# ----------------------------------------------------------------------------------------------------------------
# Local layouts
# ----------------------------------------------------------------------------------------------------------------

def pick_union_columns(cfg, columns: dict[str, str], visible: list[str], where: str) -> list[str]:
    """The keys of the --conditioning_image_columns columns (none for a plain ControlNet)."""
    keys = []
    for column in union_columns(cfg):
        if column not in columns:
            raise UserError(f"--conditioning_image_columns {cfg.conditioning_image_columns}: no column {column!r} "
                            f"in {where}; columns are: {', '.join(visible)}")
        keys.append(columns[column])
    return keys


def refuse_union(cfg, layout: str) -> None:
    if union_columns(cfg):
        raise UserError(f"--conditioning_image_columns: the {layout} layout has one conditioning image per row; "
                        "give a union ControlNet's conditions as named columns: an imagefolder metadata.jsonl "
                        "(depth_file_name, canny_file_name, ...), a datasets dataset or --jsonl_for_train")


def read_metadata_rows(metadata: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a metadata.jsonl or metadata.csv."""
    if metadata.suffix == ".csv":
        with open(metadata, newline="", encoding="utf-8") as fh:
            return [(n, row) for n, row in enumerate(csv.DictReader(fh), start=2)]
    return read_rows(metadata, str(metadata))


def imagefolder_column_name(key: str) -> str:
    """The column `datasets`' imagefolder makes of a metadata key: file_name -> image, X_file_name -> X."""
    if key == "file_name":
        return "image"
    return key[: -len("_file_name")] if key.endswith("_file_name") else key


def read_imagefolder(metadata: Path, cfg) -> Examples:
    rows = first_n(read_metadata_rows(metadata), cfg)
    if not rows:
        return FileExamples([], identity_of(cfg, "imagefolder", {}), f"{metadata} has no rows")
    root = str(metadata.parent)
    keys: list[str] = []
    for _, row in rows:
        keys += [k for k in row if k not in keys]
    columns = {imagefolder_column_name(key): key for key in keys}
    visible = list(columns)
    columns.update({key: key for key in keys if key not in columns})  # the raw keys are accepted too
    where = str(metadata)
    image_key, cond_key, caption_key = pick_columns(cfg, columns, visible, where)
    union_keys = pick_union_columns(cfg, columns, visible, where)
    examples = []
    for line, row in rows:
        where = f"{metadata} line {line}"
        paths = [None if key is None else existing_file(root, row.get(key), where, key) for key in (image_key, cond_key)]
        union = tuple(existing_file(root, row.get(key), where, key) for key in union_keys) or None
        examples.append(Example(paths[0], paths[1], caption_value(row.get(caption_key)), paths[0], union))
    columns_used = {"image": image_key, "conditioning": cond_key, "caption": caption_key}
    if union_keys:  # only then: a plain run's fingerprint stays what it was
        columns_used["union"] = union_keys
    return FileExamples(examples, identity_of(cfg, "imagefolder", columns_used), f"imagefolder layout {metadata}")


def read_fill50k(prompt_file: Path, cfg) -> Examples:
    """Fill50K's prompt.json: one JSON object per line (a single JSON list is read too)."""
    refuse_union(cfg, "Fill50K")
    text = prompt_file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as exc:
            raise UserError(f"{prompt_file}: not valid JSON ({exc.msg})") from None
    else:
        rows = read_metadata_rows(prompt_file)
    rows = first_n(rows, cfg)
    root = str(prompt_file.parent)
    examples = []
    for line, row in rows:
        missing = [k for k in ("target", "prompt") + (() if cfg.condition else ("source",)) if k not in row]
        if missing:
            raise UserError(f"{prompt_file} line {line}: missing {', '.join(missing)}; Fill50K rows have source, "
                            "target and prompt")
        where = f"{prompt_file} line {line}"
        paths = [None if key is None else existing_file(root, row[key], where, key)
                 for key in ("target", None if cfg.condition else "source")]
        examples.append(Example(paths[0], paths[1], caption_value(row["prompt"]), paths[0]))
    return FileExamples(examples, identity_of(cfg, "fill50k", {}), f"Fill50K layout {prompt_file}")


def existing_file(root: str, relative: str | None, where: str, key: str) -> str:
    """The row's file under root (os.path, not pathlib: this runs for every row of 50k-row datasets)."""
    if not relative:
        raise UserError(f"{where}: no {key!r}; every row needs one")
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        raise UserError(f"{where}: {key} {relative} not found at {path}; fix the row or remove it")
    return path


def images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            raise UserError(f"{folder}: two images share the stem {path.stem!r} ({found[path.stem].name}, "
                            f"{path.name}); keep one")
        found[path.stem] = path
    return found


def read_kohya(images_dir: Path, cond_dir: Path | None, cfg, flag: str) -> Examples:
    refuse_union(cfg, "kohya (images/ + conditioning/)")
    images = images_by_stem(images_dir)
    conditions = images_by_stem(cond_dir) if cond_dir is not None else {}
    stems = first_n(sorted(images), cfg)
    examples, uncaptioned = [], 0
    for stem in stems:
        image = images[stem]
        cond = None
        if cond_dir is not None:
            if stem not in conditions:
                raise UserError(f"{flag}: {image} has no conditioning image {cond_dir}/{stem}.* (any of "
                                f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)}); add it or remove the image")
            cond = str(conditions[stem])
        caption = ""
        for suffix in CAPTION_SUFFIXES:
            caption_file = image.with_suffix(suffix)
            if caption_file.is_file():
                caption = caption_file.read_text(encoding="utf-8").strip()
                break
        else:
            uncaptioned += 1
        examples.append(Example(str(image), cond, caption, str(image)))
    if uncaptioned:
        logger.warning("%d of %d images in %s have no .txt/.caption file; their caption is empty", uncaptioned,
                       len(stems), images_dir)
    layout = "kohya" if cond_dir is not None else "images"
    return FileExamples(examples, identity_of(cfg, layout, {}), f"{layout} layout {images_dir}")


# ----------------------------------------------------------------------------------------------------------------
# `datasets` sources
# ----------------------------------------------------------------------------------------------------------------

def read_saved_dataset(folder: Path, cfg, flag: str) -> Examples:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{flag} {folder}: cannot read the save_to_disk folder ({exc})") from None
    return from_dataset(train_split(dataset, f"{flag} {folder}"), cfg, f"{flag} {folder}", f"saved dataset {folder}")


def open_hub_dataset(cfg) -> Examples:
    return open_with_load_dataset(cfg.dataset_name, cfg.dataset_config_name, cfg, "--dataset_name")


def open_with_load_dataset(name: str, config_name: str | None, cfg, flag: str) -> Examples:
    import datasets

    where = f"{flag} {name}"
    with load_errors(where):
        dataset = datasets.load_dataset(name, config_name, cache_dir=cfg.cache_dir)
    return from_dataset(train_split(dataset, where), cfg, where, f"datasets {name}")


def train_split(dataset, where: str):
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, dict)):
        if "train" not in dataset:
            raise UserError(f"{where}: no 'train' split; splits are: {', '.join(dataset)}")
        dataset = dataset["train"]
    if not isinstance(dataset, datasets.Dataset):
        raise UserError(f"{where}: expected a map-style dataset, got {type(dataset).__name__}")
    return dataset


def from_dataset(dataset, cfg, where: str, description: str) -> Examples:
    available = list(dataset.column_names)
    image, cond, caption = pick_columns(cfg, {c: c for c in available}, available, where)
    union = pick_union_columns(cfg, {c: c for c in available}, available, where)
    if cfg.max_train_samples and cfg.max_train_samples < len(dataset):
        dataset = dataset.select(range(cfg.max_train_samples))
    columns = {"image": image, "conditioning": cond, "caption": caption}
    if union:
        columns["union"] = union
    identity = identity_of(cfg, "datasets", columns)
    return DatasetExamples(dataset, image, cond, caption, identity, description, union)
