"""Writes that survive a crash: what an atomic save fsyncs before the rename that publishes it."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_tree(folder: Path) -> None:
    """Every file under `folder` on disk, then the folder's own entries: a rename after this publishes data, not
    names of files the kernel still holds in memory."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """The folder's entries (a rename or a new file in it) on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
