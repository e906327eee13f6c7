"""Where a base is: a diffusers folder, a hub id, a single .ckpt/.safetensors file, or 'toy'.

`check_base_arg` runs before anything heavy so a typo fails in a second, not after minutes of loading. Apart from
zeroconv.models.base so the single-file loader, which base uses, can resolve names without importing it back.
"""

from __future__ import annotations

import re
from pathlib import Path

from zeroconv.errors import UserError
from zeroconv.hub import hub_offline

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_base(name: str) -> str:
    """'toy' -> the shipped toy base's folder; anything else unchanged."""
    if name == "toy":
        from zeroconv.models.toy_base import toy_base_path

        return str(toy_base_path())
    return name


def check_base_arg(name: str | None, flag: str = "--pretrained_model_name_or_path", revision: str | None = None,
                   cache_dir: str | None = None) -> None:
    """Fail fast on a base that cannot be loaded: missing path, not a diffusers folder, hub id while offline."""
    if not name:
        raise UserError(f"{flag} is required: a diffusers folder, a hub id, a .safetensors/.ckpt file, or 'toy'")
    path = Path(resolve_base(name))
    if path.exists():
        if path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise UserError(f"{flag} {name}: not a model file (expected {', '.join(SINGLE_FILE_SUFFIXES)})")
            return
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise UserError(f"{flag} {name}: folder has no model_index.json or unet/; expected a diffusers SD "
                            "folder (save one with StableDiffusionPipeline.save_pretrained)")
        return
    if not HUB_ID.match(name):
        raise UserError(f"{flag} {name}: no such file or folder")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model_index.json", cache_dir=cache_dir, revision=revision)
        if not isinstance(cached, str):
            raise UserError(f"{flag} {name}: not a local path, and the hub is offline (HF_HUB_OFFLINE=1) with no "
                            "cached copy; download it first or pass a local folder")
