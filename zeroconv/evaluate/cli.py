"""`zeroconv eval`: controllability metrics recomputed from saved images, so anyone can check a reported figure.

Input is a samples JSONL, one generated image a line: {"image": path, "condition": path, "prompt": text}, paths
relative to the JSONL's folder (what `zeroconv sample` and `zeroconv demo` write). Rows may carry "metric"
(used when --metric is not given) and any other keys; --group_by names the key whose values get a row each in the
printed table (the demo writes "model": "base" or "controlnet@step-N").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zeroconv.config import option, parse
from zeroconv.errors import UserError
from zeroconv.jsonl import read_rows


@dataclass
class EvalConfig:
    samples: str = option(None, "Samples JSONL: {\"image\", \"condition\", \"prompt\"} a line, paths relative to it.")
    metric: str | None = option(None, "Metric to compute (see zeroconv.evaluate.metrics). Default: each row's "
                                "\"metric\" key.")
    group_by: str | None = option("model", "Row key whose values are reported separately; rows without it form "
                                  "one group 'all'.")
    out: str | None = option(None, "Also write the per-group means as JSON to this file.")


def read_samples(path: str | Path) -> list[dict]:
    """The rows of a samples JSONL, with image and condition resolved to absolute paths."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such samples file; write one with `zeroconv sample` or `zeroconv demo`")
    expected = 'expected {"image": path, "condition": path, "prompt": text}'
    rows = []
    for number, row in read_rows(path, str(path), expected):
        try:
            for key in ("image", "condition"):
                file = Path(row[key])
                row[key] = file if file.is_absolute() else path.parent / file
            row.setdefault("prompt", "")
        except (KeyError, TypeError):
            raise UserError(f"{path} line {number}: {expected}") from None
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no samples in it")
    return rows


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    from zeroconv.data.transforms import to_rgb

    if not path.is_file():
        raise UserError(f"{path}: image listed in the samples file does not exist")
    with Image.open(path) as image:
        return np.asarray(to_rgb(image))  # the conversion training used, so scores read the same pixels


def score_samples(rows: list[dict], metric: str | None = None, group_by: str | None = "model"
                  ) -> dict[str, dict[str, float]]:
    """Mean of every score per group: {group: {score name: mean, ..., "count": n}}, groups in order of appearance."""
    from zeroconv.evaluate.metrics import get_metric

    scores: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        name = metric or row.get("metric")
        if not name:
            raise UserError(f"{row['image']}: no metric; pass --metric (e.g. --metric fill)")
        values = get_metric(name)(load_rgb(row["condition"]), row["prompt"], load_rgb(row["image"]))
        group = str(row.get(group_by, "all")) if group_by else "all"
        for key, value in values.items():
            scores.setdefault(group, {}).setdefault(key, []).append(float(value))
    return {group: {**{k: float(np.mean(v)) for k, v in named.items()}, "count": len(next(iter(named.values())))}
            for group, named in scores.items()}


def format_table(means: dict[str, dict[str, float]]) -> str:
    columns = [k for k in next(iter(means.values())) if k != "count"] + ["count"]
    first = max(len("group"), *map(len, means))
    widths = [max(len(c), 6) for c in columns]
    lines = ["  ".join(["group".ljust(first)] + [c.rjust(w) for c, w in zip(columns, widths)])]
    for group, values in means.items():
        cells = [f"{values[c]:.0f}" if c == "count" else f"{values[c]:.3f}" for c in columns]
        lines.append("  ".join([group.ljust(first)] + [cell.rjust(w) for cell, w in zip(cells, widths)]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(EvalConfig, argv, prog="zeroconv eval", positional=("samples",), description=__doc__)
    means = score_samples(read_samples(cfg.samples), cfg.metric, cfg.group_by)
    print(format_table(means))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(means, indent=1))
    return 0
