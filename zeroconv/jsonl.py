"""JSON Lines, read one way: the metadata, caption, samples and metrics files zeroconv reads a row a line of."""

from __future__ import annotations

import json
from pathlib import Path

from zeroconv.errors import UserError


def read_rows(path: str | Path, label: str, hint: str = "one JSON object per line") -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object is a UserError naming
    `label` (the flag and file) and the line, with `hint` saying what a row should be."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{label} line {number}: not valid JSON ({exc.msg}); {hint}") from None
            if not isinstance(row, dict):
                raise UserError(f"{label} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def read_growing(path: str | Path) -> list[dict]:
    """The objects of a JSONL file another process may be appending to: a line that does not parse is skipped,
    since during training the last one may be half written."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
