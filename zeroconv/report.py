"""`zeroconv report RUN_DIR [RUN_DIR ...]`: one HTML page that shows control being learned.

The page is built only from what a run already writes, so it works on a run still training (it shows what exists
so far) and on one that finished:

- a `zeroconv train` output_dir: metrics.jsonl, validation/step-NNNNNN.png, config.yaml, train_summary.json;
- a `zeroconv demo` output_dir: summary.json (baseline and held-out scores), samples.jsonl + samples/ (the grid of
  each validation is composed from them: condition | sample, prompt underneath), and its training run in
  controlnet/ (loss, samples/s, config.yaml).

It has a slider over the validation steps per run showing that step's grid (arrow keys step it), the loss and every
controllability metric over steps with the base-alone baseline (step 0) and the "control appeared" step marked
(zeroconv.evaluate.curve.summarize: halfway from the baseline to the best score), values on hover, and each run's
config and summary. Several runs share one chart per metric, one line each, and get a slider each.

The file is self-contained: images are data URIs, the script and styles are inline, nothing is fetched, so it
opens offline, can be mailed, and a browser reload during training shows the latest validation (`zeroconv train
--report` rewrites it at every validation, atomically, so a reload never sees half a page).

Charts are plain inline SVG written here, not a JavaScript chart library. The page needs a few line charts with
points, two kinds of marker lines and a hover read-out: about 180 lines of Python and 60 of script. A maintained
library (uPlot, Chart.js, Plotly: about 50 KB to over 3 MB minified) would have to be vendored into the
repository to work offline, kept up to date by hand, and inlined into every report; and with SVG drawn here the
charts are complete even with scripts off, and a plain unit test can count their points without a browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from zeroconv.config import option, parse
from zeroconv.errors import UserError
from zeroconv.jsonl import read_growing

logger = logging.getLogger("zeroconv.report")

GRID_FILE = re.compile(r"^step-(\d+)\.png$")
# A grid embedded as PNG above this size is re-encoded as JPEG: 512 px SD grids are ~2 MB each as PNG, and a page
# of a hundred of them would be too heavy for a browser to reload during training.
MAX_PNG_BYTES = 600_000
# The demo's samples are 64 px; shown at least this large (nearest neighbour) so a circle's outline can be seen.
MIN_TILE = 128
COLORS = ["#1f5bc4", "#e0701a", "#2a9d3a", "#c23b5a", "#7b4fc9", "#8c6d1f", "#1b9aaa", "#555555"]


@dataclass
class ReportConfig:
    run_dir: list[str] = option(
        [], "Run folders: the --output_dir of `zeroconv train` or of `zeroconv demo`, finished or still training. "
        "With several, their curves share one chart per metric and each gets its own slider.", metavar="RUN_DIR")
    out: str | None = option(
        None, "HTML file to write. Default: RUN_DIR/report.html for one run, report.html in the current folder for "
        "several.", metavar="FILE.html")


# ---------------------------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    folder: Path
    kind: str  # "train" or "demo"
    name: str = ""
    loss: dict[int, float] = field(default_factory=dict)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)  # curve.summarize per metric
    grids: list[tuple[int, str]] = field(default_factory=list)  # (step, data URI), by step
    config_text: str = ""
    facts: list[tuple[str, str]] = field(default_factory=list)
    finished: bool = False


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or being rewritten right now
        return {}
    return data if isinstance(data, dict) else {}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_run(folder: str | Path) -> Run:
    from zeroconv.evaluate.curve import summarize

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"RUN_DIR {folder}: no such folder; give the --output_dir of a `zeroconv train` or "
                        "`zeroconv demo` run")
    if (folder / "samples.jsonl").is_file() or (folder / "summary.json").is_file():
        run = Run(folder, "demo")
        read_demo(run)
    elif any((folder / name).exists() for name in ("metrics.jsonl", "config.yaml", "validation")):
        run = Run(folder, "train")
        read_train(run, folder)
    else:
        raise UserError(f"RUN_DIR {folder}: neither a `zeroconv train` output_dir (no metrics.jsonl, config.yaml or "
                        "validation/) nor a `zeroconv demo` one (no summary.json or samples.jsonl); give the folder "
                        "that was passed as --output_dir")
    # a NaN score (a validation that produced blank images) has no place on an axis, nor in a baseline
    run.curves = {key: kept for key, curve in run.curves.items()
                  if (kept := {step: value for step, value in curve.items() if finite(value)})}
    run.summaries = {key: summarize(curve, key) for key, curve in run.curves.items()}
    return run


def read_train(run: Run, folder: Path, metric_prefixes: tuple[str, ...] | None = None) -> None:
    """Loss, controllability curves, grids, config and counters of a `zeroconv train` output_dir."""
    from zeroconv.evaluate.curve import curves_from_rows

    rows = [row for row in read_growing(folder / "metrics.jsonl") if isinstance(row.get("step"), int)]
    run.loss = {row["step"]: row["train/loss"] for row in rows if finite(row.get("train/loss"))}
    if metric_prefixes is None:
        # validation/ is --validation_metric; any other prefix but train/ is an evaluator's (the demo's heldout/)
        metric_prefixes = tuple(sorted({k.split("/")[0] + "/" for row in rows for k in row
                                        if "/" in k and not k.startswith("train/")}))
    for prefix in metric_prefixes:
        for key, curve in curves_from_rows(rows, prefix).items():
            run.curves[key if prefix == "validation/" else prefix + key] = curve
    grid_dir = folder / "validation"
    if grid_dir.is_dir():
        found = sorted((int(m.group(1)), p) for p in grid_dir.iterdir() if (m := GRID_FILE.match(p.name)))
        run.grids = [(step, uri) for step, path in found if (uri := image_uri(path)) is not None]
    if (folder / "config.yaml").is_file():
        run.config_text = (folder / "config.yaml").read_text(errors="replace")
    summary = read_json(folder / "train_summary.json")
    last = rows[-1] if rows else {}
    last_step = max((row["step"] for row in rows), default=0)
    # a resumed run trains past the train_summary.json its first part left behind
    if summary.get("global_step", 0) < last_step:
        summary = {}
    run.finished = bool(summary)
    config = parse_yaml(run.config_text)
    planned = config.get("max_train_steps")
    if run.finished:
        run.facts.append(("status", f"finished at step {summary.get('global_step', last_step)}"))
    else:
        run.facts.append(("status", f"in progress (or stopped) at step {last_step}"
                          + (f" of {planned}" if planned else "") + ": no train_summary.json for it yet"))
    logged = [row for row in rows if "train/loss" in row]
    latest = logged[-1] if logged else last
    skipped = summary.get("skipped_samples", latest.get("train/skipped_samples"))
    nonfinite = summary.get("nonfinite_steps", latest.get("train/nonfinite_steps"))
    run.facts.append(("skipped samples", "-" if skipped is None else f"{skipped} (unreadable, replaced by others)"))
    steps_text = ""
    if summary.get("nonfinite_log"):
        shown = summary["nonfinite_log"][:10]
        steps_text = " at step " + ", ".join(map(str, shown)) + (" ..." if len(summary["nonfinite_log"]) > 10 else "")
    run.facts.append(("non-finite steps", "-" if nonfinite is None else f"{nonfinite} (update skipped){steps_text}"))
    wall = wall_seconds(folder)
    if wall is not None:
        run.facts.append(("training wall time", f"{format_seconds(wall)} (config.yaml written to the last record; a "
                          "resumed run counts from its last start)"))
    speeds = [row["train/samples_per_s"] for row in logged if finite(row.get("train/samples_per_s"))]
    if speeds:
        run.facts.append(("samples/s", f"{sum(speeds) / len(speeds):.2f} mean of {len(speeds)} logged intervals, "
                          f"{speeds[-1]:.2f} in the last"))
    for name in ("pretrained_model_name_or_path", "resolution", "train_batch_size", "learning_rate",
                 "condition_encoder_init"):
        if name in config:
            run.facts.append((name, str(config[name])))


def read_demo(run: Run) -> None:
    """A `zeroconv demo` folder: scores from summary.json (the baseline is only there), the rest from the run."""
    folder = run.folder
    summary = read_json(folder / "summary.json")
    train_dir = folder / "controlnet"
    train_run = Run(train_dir, "train")
    if train_dir.is_dir():
        read_train(train_run, train_dir, metric_prefixes=("heldout/",))
    # summary.json has the base-alone baseline (sampled by the demo itself, at step 0) and every validation so far
    run.curves = {key.removeprefix("heldout/"): curve for key, curve in train_run.curves.items()}
    for row in [{"step": 0, **summary["baseline"]}] if isinstance(summary.get("baseline"), dict) else []:
        for key, value in row.items():
            if key != "step" and finite(value):
                run.curves.setdefault(key, {})[0] = float(value)
    for row in summary.get("history") or []:
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        for key, value in row.items():
            if key not in ("step", "model") and finite(value):
                run.curves.setdefault(key, {})[row["step"]] = float(value)
    run.curves = {key: dict(sorted(curve.items())) for key, curve in run.curves.items()}
    run.loss = train_run.loss
    config = summary.get("config") or {}
    run.grids = demo_grids(folder, int(config.get("grid_rows") or 6))
    run.finished = "wall_seconds" in summary
    run.facts = [("status", "finished" if run.finished else "in progress (or stopped): no final summary.json yet")]
    if summary.get("control_threshold") is not None:
        step = summary.get("control_step")
        run.facts.append((f"demo: fill IoU first above {summary['control_threshold']}",
                          f"step {step}" if step is not None else "not yet"))
    if run.finished:
        run.facts.append(("demo wall time", f"{format_seconds(summary['wall_seconds'])} (training and validation "
                          f"{format_seconds(summary.get('train_seconds', 0))})"))
    run.facts += [fact for fact in train_run.facts if fact[0] != "status"]
    parts = []
    if config:
        parts.append("# zeroconv demo (summary.json config)\n" + dump_yaml(config))
    if train_run.config_text:
        parts.append("# its training run (controlnet/config.yaml)\n" + train_run.config_text)
    run.config_text = "\n".join(parts)


def demo_grids(folder: Path, rows_shown: int) -> list[tuple[int, str]]:
    """One grid per validation from samples.jsonl: condition | sample, prompt underneath; step 0 is the base
    alone."""
    from PIL import Image

    by_step: dict[int, list[dict]] = {}
    for row in read_growing(folder / "samples.jsonl"):
        if isinstance(row.get("step"), int) and "image" in row and "condition" in row:
            by_step.setdefault(row["step"], []).append(row)
    grids = []
    for step in sorted(by_step):
        tiles = []
        for row in by_step[step][:rows_shown]:
            try:
                with Image.open(folder / row["condition"]) as c, Image.open(folder / row["image"]) as s:
                    scale = max(1, -(-MIN_TILE // c.size[0]))
                    size = (c.size[0] * scale, c.size[1] * scale)
                    tiles.append((c.convert("RGB").resize(size, Image.NEAREST),
                                  [s.convert("RGB").resize(size, Image.NEAREST)], row.get("prompt", "")))
            except OSError:  # a sample being written right now
                continue
        if tiles:
            buffer = io.BytesIO()
            sheet(tiles).save(buffer, format="PNG")
            grids.append((step, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()))
    return grids


def sheet(tiles: list, per_row: int = 3, gap: int = 6):
    """evaluate.grid.make_grid's condition | sample pairs, `per_row` of them side by side: one pair a row would make
    the demo's six held-out examples a column taller than a screen."""
    from PIL import Image

    from zeroconv.evaluate.grid import make_grid

    pairs = [make_grid([tile]) for tile in tiles]
    width, height = pairs[0].size
    columns = min(per_row, len(pairs))
    rows = -(-len(pairs) // columns)
    out = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for i, pair in enumerate(pairs):
        out.paste(pair, ((i % columns) * (width + gap), (i // columns) * (height + gap)))
    return out


def image_uri(path: Path) -> str | None:
    """The image as a data URI, or None if it does not decode (a grid being written right now)."""
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if len(data) > MAX_PNG_BYTES:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG", quality=88)
                return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode()


def wall_seconds(folder: Path) -> float | None:
    """From config.yaml (written when training starts) to the newest record of the run: metrics.jsonl rows carry
    no clock time, so file times are what is left."""
    start = folder / "config.yaml"
    ends = [p.stat().st_mtime for p in (folder / "metrics.jsonl", folder / "train_summary.json") if p.is_file()]
    if not start.is_file() or not ends:
        return None
    return max(0.0, max(ends) - start.stat().st_mtime)


def format_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def parse_yaml(text: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def dump_yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def name_runs(runs: list[Run]) -> None:
    """Folder names; where two are the same (demo-a/controlnet, demo-b/controlnet), the parent's name too."""
    names = [run.folder.resolve().name for run in runs]
    names = ["/".join(run.folder.resolve().parts[-2:]) if names.count(name) > 1 else name
             for run, name in zip(runs, names)]
    for i, run in enumerate(runs):
        run.name = f"{names[i]} #{i + 1}" if names.count(names[i]) > 1 else names[i]


# ---------------------------------------------------------------------------------------------------------------
# Charts: SVG drawn here (see the module docstring for why not a library)
# ---------------------------------------------------------------------------------------------------------------

WIDTH, PLOT_H, LEFT, RIGHT, TOP = 640, 230, 66, 18, 34
X_AXIS_H = 44  # tick labels and the x axis title under the plot
LEGEND_ROW = 18


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def format_tick(value: float, step: float) -> str:
    """As many decimals as the tick spacing needs: 0.4025 and 0.4030 must not both read 0.403."""
    if abs(value) >= 1e6 or (0 < abs(value) < 1e-4):
        return f"{value:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if f"{step:.1e}"[2] == "5" and step < 1 else 0)
    return f"{value:.{decimals}f}"


FRACTIONS = ("f1", "precision", "recall", "ssim", "iou", "accuracy")


def metric_axis(key: str) -> tuple[str, str, tuple[float, float] | None]:
    """(chart title, y axis title with the unit, the scale's bounds) of a controllability metric."""
    from zeroconv.evaluate.curve import lower_is_better

    name = key.split("/")[-1]
    direction = "lower is better" if lower_is_better(name) else "higher is better"
    if "psnr" in name:
        unit, bounds = "PSNR (dB)", None
    elif "rmse" in name:
        unit, bounds = "RMSE (intensity, 0-1)", (0.0, 1.0)
    elif any(word in name for word in FRACTIONS):
        unit, bounds = "score (fraction, 0-1)", (0.0, 1.0)
    else:
        unit, bounds = "score", None
    return f"{key} ({direction})", unit, bounds


@dataclass
class Series:
    run: int
    label: str
    color: str
    points: list[tuple[int, float]]
    baseline: float | None = None
    appeared: int | None = None
    dots: bool = True


def legend_layout(items: list[str]) -> list[tuple[float, float]]:
    """Left-to-right, wrapping: (x, y) of each legend item below the x axis."""
    x, y, spots = LEFT, 0.0, []
    for label in items:
        width = 30 + 6.6 * len(label) + 16
        if x + width > WIDTH - RIGHT and x > LEFT:
            x, y = LEFT, y + LEGEND_ROW
        spots.append((x, y))
        x += width
    return spots


def line_chart(chart_id: str, title: str, quantity: str, y_label: str, series: list[Series],
               bounds: tuple[float, float] | None = None) -> tuple[str, dict]:
    """(SVG markup, hover data): one line per series, dashed base-alone line, dotted control-appeared line."""
    xs = [x for s in series for x, _ in s.points] or [0]
    ys = [y for s in series for _, y in s.points] + [s.baseline for s in series if s.baseline is not None]
    ys = ys or [0.0]
    x_hi = max(max(xs), 1)
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.08 or (abs(y_hi) * 0.1 or 0.5)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    if bounds is not None:  # a flat fraction at 1.0 is drawn inside 0-1, not around it
        y_lo, y_hi = max(y_lo, bounds[0]), min(y_hi, bounds[1])
    plot_w = WIDTH - LEFT - RIGHT

    def px(x: float) -> float:
        return round(LEFT + plot_w * x / x_hi, 2)

    def py(y: float) -> float:
        return round(TOP + PLOT_H * (1 - (y - y_lo) / (y_hi - y_lo)), 2)

    legend = [(s.label, "line", s.color) for s in series]
    if any(s.baseline is not None for s in series):
        legend.append(("base alone (step 0)", "baseline", "#666"))
    if any(s.appeared is not None for s in series):
        legend.append(("control appeared (halfway from base to best)", "appeared", "#666"))
    spots = legend_layout([label for label, _, _ in legend])
    height = TOP + PLOT_H + X_AXIS_H + (spots[-1][1] if spots else 0) + LEGEND_ROW + 6
    e = html.escape
    out = [f'<svg class="chart" id="{e(chart_id)}" data-chart="{e(chart_id)}" viewBox="0 0 {WIDTH} {height:.0f}" '
           f'width="{WIDTH}" height="{height:.0f}" role="img" aria-label="{e(title)}" '
           'xmlns="http://www.w3.org/2000/svg">',
           f'<text class="title" x="{LEFT}" y="20">{e(title)}</text>',
           f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{PLOT_H}"/>']
    y_ticks = nice_ticks(y_lo, y_hi)
    for tick in y_ticks:
        y = py(tick)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y}" y2="{y}"/>'
                   f'<text class="tick" x="{LEFT - 6}" y="{y + 4}" text-anchor="end">'
                   f'{format_tick(tick, y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1)}</text>')
    for tick in nice_ticks(0, x_hi):
        if tick != int(tick):
            continue  # steps are whole numbers
        x = px(tick)
        out.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{TOP}" y2="{TOP + PLOT_H}"/>'
                   f'<text class="tick" x="{x}" y="{TOP + PLOT_H + 16}" text-anchor="middle">{int(tick)}</text>')
    out.append(f'<text class="axis" x="{LEFT + plot_w / 2}" y="{TOP + PLOT_H + 36}" text-anchor="middle">training '
               'step (optimizer steps)</text>')
    out.append(f'<text class="axis" transform="translate(14 {TOP + PLOT_H / 2}) rotate(-90)" '
               f'text-anchor="middle">{e(y_label)}</text>')
    hover = []
    for s in series:
        if s.baseline is not None:
            y = py(s.baseline)
            out.append(f'<line class="baseline" stroke="{s.color}" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y}" '
                       f'y2="{y}"><title>{e(s.label)}: base alone {s.baseline:.4g}</title></line>')
        if s.appeared is not None:
            x = px(s.appeared)
            right = x > LEFT + plot_w * 0.8  # near the right edge the label goes left of its line
            label_x, label_y = x - 3 if right else x + 3, TOP + 12 + 12 * s.run
            out.append(f'<line class="appeared" stroke="{s.color}" x1="{x}" x2="{x}" y1="{TOP}" y2="{TOP + PLOT_H}">'
                       f'<title>{e(s.label)}: control appeared at step {s.appeared}</title></line>'
                       f'<text class="mark" fill="{s.color}" x="{label_x}" y="{label_y}" '
                       f'text-anchor="{"end" if right else "start"}">control @ '
                       f'{s.appeared}</text>')
        coords = [(px(x), py(y), x, y) for x, y in s.points]
        if coords:
            path = " ".join(f"{cx},{cy}" for cx, cy, _, _ in coords)
            out.append(f'<polyline class="series" data-run="{s.run}" stroke="{s.color}" points="{path}"/>')
        if s.dots:
            for cx, cy, x, y in coords:
                out.append(f'<circle class="pt" data-run="{s.run}" data-step="{x}" data-value="{y:.6g}" cx="{cx}" '
                           f'cy="{cy}" r="3.5" fill="{s.color}"><title>{e(s.label)}: step {x}, {y:.4g}</title>'
                           '</circle>')
        hover.append({"label": s.label, "color": s.color, "baseline": s.baseline,
                      "points": [[cx, cy, x, y] for cx, cy, x, y in coords]})
    for (label, kind, color), (x, dy) in zip(legend, spots):
        y = TOP + PLOT_H + X_AXIS_H + dy + 8
        if kind == "appeared":
            swatch = f'<line class="appeared" stroke="{color}" x1="{x + 12}" x2="{x + 12}" y1="{y - 7}" y2="{y + 7}"/>'
        else:
            swatch = f'<line class="{"baseline" if kind == "baseline" else "series"}" stroke="{color}" x1="{x}" ' \
                     f'x2="{x + 24}" y1="{y}" y2="{y}"/>'
        out.append(f'<g class="legend">{swatch}<text x="{x + 30}" y="{y + 4}">{e(label)}</text></g>')
    out.append(f'<circle class="cursor" r="6" cx="-20" cy="-20"/>')
    out.append("</svg>")
    return "\n".join(out), {"id": chart_id, "quantity": quantity, "series": hover}


def charts_for(runs: list[Run]) -> list[tuple[str, dict]]:
    charts = []
    loss = [Series(i, run.name, COLORS[i % len(COLORS)], sorted(run.loss.items()), dots=len(run.loss) <= 60)
            for i, run in enumerate(runs) if run.loss]
    if loss:
        charts.append(line_chart("chart-loss", "Training loss (lower is better)", "loss",
                                 "MSE of the prediction target", loss))
    keys = list(dict.fromkeys(key for run in runs for key in run.curves))
    for n, key in enumerate(keys):
        series = []
        for i, run in enumerate(runs):
            if key in run.curves:
                s = run.summaries.get(key, {})
                series.append(Series(i, run.name, COLORS[i % len(COLORS)], sorted(run.curves[key].items()),
                                     baseline=s.get("baseline"), appeared=s.get("control_appeared_at")))
        title, unit, bounds = metric_axis(key)
        charts.append(line_chart(f"chart-metric-{n}", title, key, unit, series, bounds))
    return charts


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f6f8}
header{padding:14px 22px 6px}h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:0 0 8px}
.note{color:#555;margin:2px 0}.live{color:#a15c00}
main{padding:0 22px 22px}.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 14px;margin:0 0 16px}
.viewer{flex:1 1 420px;min-width:0}.viewer input[type=range]{width:100%;margin:6px 0}.steplabel{font-weight:600}
.viewer img{display:block;image-rendering:pixelated;max-width:100%;border:1px solid #ccc;margin-top:6px}
.values{color:#333;font-size:13px;margin-top:4px}.empty{color:#777}
.chart-card{flex:1 1 440px;max-width:680px}svg.chart{display:block;width:100%;height:auto;font-size:12px}
svg .title{font-size:14px;font-weight:600}svg .plot{fill:#fff;stroke:#999}svg .grid{stroke:#eee}
svg .tick{fill:#444}svg .axis{fill:#222;font-size:12px}svg .mark{font-size:11px}
svg .series{fill:none;stroke-width:2}svg .baseline{stroke-width:1.5;stroke-dasharray:6 4}
svg .appeared{stroke-width:1.5;stroke-dasharray:2 3}svg .legend text{fill:#222}
svg .cursor{fill:none;stroke:#111;stroke-width:1.5;visibility:hidden}
#tip{position:absolute;pointer-events:none;background:#222;color:#fff;padding:4px 7px;border-radius:4px;
font-size:12px;display:none;white-space:nowrap}
table{border-collapse:collapse}td{padding:2px 10px 2px 0;vertical-align:top}td:first-child{color:#555}
pre{background:#f3f3f5;padding:8px;overflow:auto;max-height:360px;font-size:12px}
"""

SCRIPT = """
const DATA = JSON.parse(document.getElementById('report-data').textContent);
const sliders = [];
let active = 0;
function show(i, k) {
  const run = DATA.runs[i], g = run.grids[k];
  const img = document.getElementById('grid-' + i);
  img.src = g.src;
  img.dataset.step = g.step;
  document.getElementById('steplabel-' + i).textContent =
    'step ' + g.step + (g.step === 0 ? ' (base alone)' : '') + '  (' + (k + 1) + ' of ' + run.grids.length + ')';
  const vals = run.values[String(g.step)] || {};
  document.getElementById('values-' + i).textContent =
    Object.keys(vals).map(key => key + ' ' + Number(vals[key]).toPrecision(3)).join(' \\u00b7 ');
  active = i;
}
DATA.runs.forEach((run, i) => {
  const s = document.getElementById('slider-' + i);
  if (!s) return;
  sliders[i] = s;
  s.addEventListener('input', () => show(i, Number(s.value)));
  s.addEventListener('focus', () => { active = i; });
  show(i, Number(s.value));
  active = 0;
});
// The arrows step the slider last used even when it does not have the focus; a focused one steps itself.
document.addEventListener('keydown', ev => {
  if (ev.key !== 'ArrowRight' && ev.key !== 'ArrowLeft') return;
  if (ev.target instanceof HTMLInputElement) return;
  const s = sliders[active];
  if (!s) return;
  const k = Math.min(Number(s.max), Math.max(0, Number(s.value) + (ev.key === 'ArrowRight' ? 1 : -1)));
  s.value = k;
  show(active, k);
  ev.preventDefault();
});
const tip = document.getElementById('tip');
document.querySelectorAll('svg.chart').forEach(svg => {
  const chart = DATA.charts[svg.dataset.chart], cursor = svg.querySelector('.cursor');
  svg.addEventListener('mousemove', ev => {
    const m = svg.getScreenCTM();
    if (!m) return;
    const p = new DOMPoint(ev.clientX, ev.clientY).matrixTransform(m.inverse());
    let best = null, bestD = Infinity;
    chart.series.forEach(s => s.points.forEach(q => {
      const d = (q[0] - p.x) ** 2 + (q[1] - p.y) ** 2;
      if (d < bestD) { bestD = d; best = [s, q]; }
    }));
    if (!best || bestD > 900) { tip.style.display = 'none'; cursor.style.visibility = 'hidden'; return; }
    const [s, q] = best;
    cursor.setAttribute('cx', q[0]); cursor.setAttribute('cy', q[1]); cursor.style.visibility = 'visible';
    let text = s.label + ': step ' + q[2] + ', ' + chart.quantity + ' ' + Number(q[3]).toPrecision(4);
    if (q[2] === 0 && s.baseline !== null) text += ' (base alone)';
    tip.textContent = text;
    tip.style.display = 'block';
    tip.style.left = (ev.pageX + 14) + 'px';
    tip.style.top = (ev.pageY - 10) + 'px';
  });
  svg.addEventListener('mouseleave', () => { tip.style.display = 'none'; cursor.style.visibility = 'hidden'; });
});
"""


def viewer_html(i: int, run: Run) -> str:
    e = html.escape
    color = COLORS[i % len(COLORS)]
    head = f'<div class="card viewer" id="viewer-{i}"><h2 style="color:{color}">{e(run.name)}</h2>'
    if not run.grids:
        why = ("no validation grid yet: the run validates every --validation_steps steps, and writes grids only with "
               "--validation_image and --validation_prompt")
        return head + f'<p class="empty">{e(why)}</p></div>'
    last = len(run.grids) - 1
    first_step, last_step = run.grids[0][0], run.grids[-1][0]
    caption = ("condition | samples, prompt underneath" if run.kind == "train" else
               "held-out outline | sample, prompt underneath; step 0 is the base alone (no ControlNet)")
    return (head + f'<label for="slider-{i}">validation step: <span class="steplabel" id="steplabel-{i}"></span>'
            f'</label><input type="range" id="slider-{i}" min="0" max="{last}" step="1" value="{last}" '
            f'aria-label="validation step of {e(run.name)}">'
            f'<div class="note">steps {first_step} to {last_step}; drag, or press the arrow keys. {e(caption)}</div>'
            f'<img id="grid-{i}" alt="validation grid of {e(run.name)}" src="{run.grids[-1][1]}" '
            f'data-step="{last_step}"><div class="values" id="values-{i}"></div></div>')


def summary_html(i: int, run: Run) -> str:
    e = html.escape
    color = COLORS[i % len(COLORS)]
    rows = [(label, value) for label, value in run.facts]
    for key, s in run.summaries.items():
        if not s:
            continue
        if s.get("baseline") is None:
            text = f"best {s['best']:.3f} at step {s['best_step']} (no step-0 baseline to compare with)"
        else:
            appeared = (f"control appeared at step {s['control_appeared_at']}" if s["control_appeared_at"] is not None
                        else "no gain over the base yet")
            text = f"base alone {s['baseline']:.3f} -> best {s['best']:.3f} at step {s['best_step']}; {appeared}"
        rows.append((key, text))
    table = "".join(f"<tr><td>{e(label)}</td><td>{e(value)}</td></tr>" for label, value in rows)
    config = (f"<details><summary>config</summary><pre>{e(run.config_text)}</pre></details>" if run.config_text
              else '<p class="empty">no config.yaml yet</p>')
    return (f'<div class="card summary" id="summary-{i}"><h2 style="color:{color}">{e(run.name)}</h2>'
            f'<table>{table}</table>{config}</div>')


def build_html(runs: list[Run]) -> str:
    """The whole page as one string: no external resource of any kind."""
    e = html.escape
    charts = charts_for(runs)
    data = {"runs": [{"name": run.name, "grids": [{"step": step, "src": src} for step, src in run.grids],
                      "values": values_by_step(run)} for run in runs],
            "charts": {hover["id"]: hover for _, hover in charts}}
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    live = [run.name for run in runs if not run.finished]
    live_note = (f'<p class="note live">still training: {e(", ".join(live))}. `zeroconv train --report` and '
                 "`zeroconv demo` rewrite this page at every validation: reload it to see the latest.</p>"
                 if live else "")
    names = ", ".join(e(run.name) for run in runs)
    chart_cards = "".join(f'<div class="card chart-card">{svg}</div>' for svg, _ in charts) or \
        '<div class="card empty">no loss or metric recorded yet</div>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>zeroconv report: {names}</title>
<style>{STYLE}</style></head>
<body>
<header><h1>zeroconv report: {names}</h1>
<p class="note">Written {time.strftime('%Y-%m-%d %H:%M')} from {e(', '.join(str(run.folder) for run in runs))}.
Grids and curves come from the run's own files; step 0 is the base alone (an untrained ControlNet changes
nothing).</p>{live_note}</header>
<main>
<div class="row">{''.join(viewer_html(i, run) for i, run in enumerate(runs))}</div>
<div class="row">{chart_cards}</div>
<div class="row">{''.join(summary_html(i, run) for i, run in enumerate(runs))}</div>
</main>
<div id="tip"></div>
<script type="application/json" id="report-data">{payload}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def values_by_step(run: Run) -> dict[str, dict[str, float]]:
    values: dict[str, dict[str, float]] = {}
    for key, curve in run.curves.items():
        for step, value in curve.items():
            values.setdefault(str(step), {})[key] = value
    return values


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Read the runs, write the page (atomically: a reload during training never sees half a file)."""
    if not run_dirs:
        raise UserError("give at least one RUN_DIR: the --output_dir of a `zeroconv train` or `zeroconv demo` run")
    runs = [read_run(folder) for folder in run_dirs]
    name_runs(runs)
    if out is None:
        out = Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("report.html")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {out / 'report.html'}")
    page = build_html(runs)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--out {out}: cannot write it ({exc.strerror}); choose a writable path") from None
    return out


def refresh_report(run_dir: str | Path) -> Path | None:
    """Rewrite RUN_DIR/report.html from what the run has written so far. Never raises: a page must not stop a
    training run."""
    try:
        return write_report([run_dir], Path(run_dir) / "report.html")
    except Exception as exc:  # noqa: BLE001 - the run goes on without its page
        logger.warning("report.html not refreshed: %s: %s", type(exc).__name__, exc)
        return None


HELP = """One self-contained HTML page (no network: images, script and styles inline) from what runs already wrote:
a slider over each run's validation grids (arrow keys step it), the loss and every controllability metric over
training steps with the base-alone baseline (step 0) and the step where control appeared marked, values on hover,
and each run's config and summary. Works on `zeroconv train` and `zeroconv demo` output folders, finished or still
training; `zeroconv train --report` rewrites OUTPUT_DIR/report.html at every validation."""


def main(argv: list[str] | None = None) -> int:
    cfg = parse(ReportConfig, argv, prog="zeroconv report", positional=("run_dir",), description=HELP)
    out = write_report(cfg.run_dir, cfg.out)
    print(f"report: {out}")
    return 0
