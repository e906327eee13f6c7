"""Captions for prepared images, from the first source that has one:

1. a sidecar file beside the image (`photo.txt` or `photo.caption`, as kohya and many scrapers write them),
2. a mapping file (CSV with a file column and a caption column, or JSONL objects with the same keys),
3. an image-to-text model (BLIP-style, through transformers; a local folder or a hub id), run in batches on the
   images that found no caption above.

A template then shapes the final text: `--caption_template "a photo of a face, {caption}"`. Its fields are
{caption} (what the sources gave, '' if none), {stem} (file name without extension), {folder} (the image's folder
relative to --images) and {condition}.

A final text comes from one of CAPTION_SOURCES: a sidecar, the mapping file, the model, the template alone (no
source had a caption, the template's own words did), or it is empty.
"""

from __future__ import annotations

import csv
import string
from pathlib import Path, PurePosixPath

from zeroconv.errors import UserError
from zeroconv.jsonl import read_rows

SIDECAR_SUFFIXES = (".txt", ".caption")
FILE_KEYS = ("file_name", "image", "file", "path", "filename")
CAPTION_KEYS = ("text", "caption", "prompt", "image_caption")
TEMPLATE_FIELDS = ("caption", "stem", "folder", "condition")
CAPTION_SOURCES = ("sidecar", "mapping", "model", "template", "empty")  # the order summaries list them in


def sidecar_caption(image_path: Path) -> str | None:
    """The caption in `image.txt` / `image.caption` beside the image, stripped; None if there is none."""
    for suffix in SIDECAR_SUFFIXES:
        candidate = image_path.with_suffix(suffix)
        if candidate.is_file():
            try:
                return candidate.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                return None
    return None


def _pick_key(keys, wanted: tuple[str, ...], path: Path, what: str) -> str:
    for key in wanted:
        if key in keys:
            return key
    raise UserError(f"--caption_file {path}: no {what} column; name it one of {', '.join(wanted)} "
                    f"(found: {', '.join(map(str, keys)) or 'none'})")


def read_caption_file(path: str | Path) -> dict[str, str]:
    """{relative image path (posix): caption} from a CSV or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--caption_file {path}: file not found")
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [row for _, row in read_rows(path, f"--caption_file {path}",
                                            "expected one object per line, or a .csv file")]
    if not rows:
        return {}
    file_key = _pick_key(rows[0].keys(), FILE_KEYS, path, "file")
    caption_key = _pick_key(rows[0].keys(), CAPTION_KEYS, path, "caption")
    return {str(PurePosixPath(str(row[file_key]).replace("\\", "/"))): str(row.get(caption_key) or "").strip()
            for row in rows if row.get(file_key)}


class CaptionLookup:
    """Sidecar files, then the mapping file (by relative path, then by bare file name if that is unambiguous)."""

    def __init__(self, mapping: dict[str, str] | None = None, sidecars: bool = True):
        self.mapping = mapping or {}
        self.sidecars = sidecars
        names: dict[str, list[str]] = {}
        for key in self.mapping:
            names.setdefault(PurePosixPath(key).name, []).append(key)
        self.by_name = {name: self.mapping[keys[0]] for name, keys in names.items() if len(keys) == 1}

    def __call__(self, image_path: Path, relative: str) -> tuple[str | None, str | None]:
        """(caption, where it came from: 'sidecar' or 'mapping'), or (None, None)."""
        if self.sidecars:
            found = sidecar_caption(image_path)
            if found is not None:
                return found, "sidecar"
        if relative in self.mapping:
            return self.mapping[relative], "mapping"
        name = PurePosixPath(relative).name
        if name in self.by_name:
            return self.by_name[name], "mapping"
        return None, None


def check_template(template: str) -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserError(f"--caption_template {template!r}: {exc}; write fields as {{caption}}, literal braces as "
                        "{{ }}") from None
    unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
    if unknown:
        raise UserError(f"--caption_template {template!r}: unknown field(s) {', '.join(unknown)}; use "
                        f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")


def fill_template(template: str | None, caption: str | None, relative: str, condition: str) -> str:
    caption = caption or ""
    if not template:
        return caption
    rel = PurePosixPath(relative)
    folder = str(rel.parent) if str(rel.parent) != "." else ""
    return template.format(caption=caption, stem=rel.stem, folder=folder, condition=condition).strip()


def text_source(text: str, source: str | None) -> str:
    """Where a final caption text came from, one of CAPTION_SOURCES: `source` is what the lookup or the model
    said ('sidecar', 'mapping', 'model'), None when none of them had a caption."""
    if not text:
        return "empty"
    return source or "template"


def empty_captions_notice(empty: int, total: int, sidecars: bool) -> str:
    """The one notice of `zeroconv prepare` when captions will be empty: how many, and every option that fills
    them."""
    sidecar = "photo.txt or photo.caption sidecar files beside the photos" + (
        "" if sidecars else " (read with --sidecar_captions true)")
    return (f"{empty} of {total} images have no caption: their text in metadata.jsonl will be empty. Captions are "
            "recommended (training pairs each condition with its prompt); fill them with --caption_model (an "
            "image-to-text model, e.g. Salesforce/blip-image-captioning-large), --caption_template (e.g. "
            f"'a photo of {{stem}}'), {sidecar}, or --caption_file (a CSV or JSONL mapping file -> caption)")


class ModelCaptioner:
    """An image-to-text model (BLIP, GIT, ...) through transformers' AutoProcessor + AutoModelForImageTextToText,
    greedy decoding so a caption is a function of the image. `prompt` starts each caption (BLIP's conditional
    mode, e.g. 'a photography of'); it is kept in the text."""

    def __init__(self, model: str, prompt: str = "", max_new_tokens: int = 30, device: str = ""):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from zeroconv.data.conditions.models import pick_device

        self.device = pick_device(device)
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"--caption_model {model}: cannot load an image-to-text model ({str(exc).splitlines()[0]});"
                            " pass a local folder or a hub id such as Salesforce/blip-image-captioning-large") from None
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def __call__(self, images: list) -> list[str]:
        import torch

        if not images:
            return []
        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", **kwargs).to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]
