"""The Hugging Face Hub, for every command that reads from it or uploads to it.

Here, below the commands, so `zeroconv train --push_to_hub` checks access before training and pushes after it
without importing the export command.
"""

from __future__ import annotations

import os
from pathlib import Path

from zeroconv.errors import UserError

# A trained decoder is saved as a full UNet in this folder of the run (zeroconv.train.finish, zeroconv.export).
DECODER_FOLDER = "unet_decoder"
# --use_ema (zeroconv.train.ema): the average in checkpoint-N/controlnet_ema, and at the end the trained weights in
# output_dir/without_ema beside the average at the top.
EMA_FOLDER = "controlnet_ema"
RAW_FOLDER = "without_ema"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# What a run folder holds that is worth sharing: the model, its configs, the card, exported files, images.
SHARED_SUFFIXES = {".safetensors", ".json", ".yaml", ".md"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif"}
PRIVATE_FOLDERS = ("checkpoint-*", "logs", "cache", ".cache", ".git", "__pycache__")


def files_to_push(folder: str | Path) -> list[str]:
    """Paths (relative, '/'-separated) of the files `push` uploads: model weights and configs at the top and in
    unet_decoder/, the card, and images (validation grids); never checkpoint-* folders, optimizer or RNG states,
    logs or caches."""
    from fnmatch import fnmatch

    folder = Path(folder)
    chosen = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch(d, pattern) for pattern in PRIVATE_FOLDERS))
        relative_root = Path(root).relative_to(folder)
        model_level = relative_root.parts in ((), (DECODER_FOLDER,))
        for name in sorted(files):
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_SUFFIXES or (model_level and suffix in SHARED_SUFFIXES):
                chosen.append((relative_root / name).as_posix())
    return chosen


def hub_token(token: str | None) -> str | None:
    from huggingface_hub import get_token

    return token or get_token()


def check_push_possible(repo_id: str, token: str | None = None) -> None:
    """Fail now, in one line, if a push to `repo_id` cannot work: bad id, offline, no token, token refused."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"hub repository id {repo_id!r} is not valid ({exc}); use 'name' or 'user/name'") from None
    if hub_offline():
        raise UserError("cannot push to the Hub: HF_HUB_OFFLINE is set; unset it, or push later with "
                        "`zeroconv push RUN --repo ID`")
    token = hub_token(token)
    if not token:
        raise UserError("cannot push to the Hub: no token; run `hf auth login`, set HF_TOKEN, or pass the token (--token; --hub_token for train)")
    try:
        HfApi(token=token).whoami()
    except Exception as exc:  # network down, or token refused: either way the push would fail at the end
        raise UserError(f"cannot push to the Hub: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload ControlNet trained with zeroconv") -> str:
    """Upload the shareable files of `folder` (files_to_push) to `repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    files = files_to_push(folder)
    if not any(name.endswith(".safetensors") for name in files):
        raise UserError(f"{folder}: no model weights (.safetensors) to push; is training finished?")
    api = HfApi(token=hub_token(token))
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo.repo_id, allow_patterns=files,
                               commit_message=commit_message)
    return str(commit)
