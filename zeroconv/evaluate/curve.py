"""The controllability curve: is control being learned, and when did it appear?

Validation at step 0 scores the base alone (an untrained ControlNet changes nothing), so every run has its own
baseline. The paper's "sudden convergence" is the step where the score first gets halfway from that baseline to
the best score seen; a run whose best is still near the baseline has not learned control yet.
"""

from __future__ import annotations

LOWER_IS_BETTER = ("rmse", "error", "distance")


def lower_is_better(key: str) -> bool:
    return any(word in key for word in LOWER_IS_BETTER)


def summarize(curve: dict[int, float], key: str) -> dict:
    """Baseline (step 0), final, best, and the step where control appeared, for one metric's curve."""
    if not curve:
        return {}
    steps = sorted(curve)
    sign = -1.0 if lower_is_better(key) else 1.0
    baseline = curve[steps[0]] if steps[0] == 0 else None
    best_step = max(steps, key=lambda s: sign * curve[s])
    summary = {"metric": key, "baseline": baseline, "final": curve[steps[-1]], "final_step": steps[-1],
               "best": curve[best_step], "best_step": best_step, "control_appeared_at": None}
    if baseline is not None:
        gain = sign * (curve[best_step] - baseline)
        summary["gain"] = gain
        if gain > 0:
            halfway = baseline + sign * gain / 2
            summary["control_appeared_at"] = next(s for s in steps if sign * (curve[s] - halfway) >= 0 and s > 0)
    return summary


def curves_from_rows(rows: list[dict], prefix: str = "validation/") -> dict[str, dict[int, float]]:
    """metrics.jsonl rows -> {metric key: {step: value}}."""
    curves: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                curves.setdefault(key[len(prefix):], {})[row["step"]] = float(value)
    return curves


def format_table(curves: dict[str, dict[int, float]]) -> str:
    """Steps down, metrics across: what the user reads at the end of a run."""
    keys = list(curves)
    steps = sorted({s for curve in curves.values() for s in curve})
    width = max([len(k) for k in keys] + [8])
    lines = ["step".rjust(8) + "".join(k.rjust(width + 2) for k in keys)]
    for step in steps:
        cells = "".join((f"{curves[k][step]:.3f}" if step in curves[k] else "-").rjust(width + 2) for k in keys)
        lines.append(f"{step:>8}{cells}")
    return "\n".join(lines)
