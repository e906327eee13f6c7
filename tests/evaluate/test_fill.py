import json

import numpy as np
import pytest
from PIL import Image

from zeroconv.data.synth import CSS_COLORS, fill_example
from zeroconv.errors import UserError
from zeroconv.evaluate.fill import fill_metrics, outline_interior
from zeroconv.evaluate.metrics import get_metric


def test_outline_interior_fills_the_closed_curve():
    example = fill_example(seed=0, index=2, resolution=64, palette="distinct")
    interior = outline_interior(example.source)
    outline = example.source.max(axis=2) > 0
    assert interior[outline].all()
    assert interior.sum() > 2 * outline.sum()
    assert not interior[0].any() and not interior[:, 0].any()


def test_target_scores_high_and_a_misplaced_circle_low():
    example = fill_example(seed=0, index=2, resolution=64, palette="distinct")
    good = fill_metrics(example.source, example.prompt, example.target)
    assert good["fill_iou"] > 0.85
    assert good["circle_color_accuracy"] == 1.0 and good["background_color_accuracy"] == 1.0
    # the same colors, circle elsewhere: colors still right, fill wrong
    circle, background = example.prompt.split(" circle with ")
    moved = np.roll(example.target, shift=(20, 20), axis=(0, 1))
    moved[:20, :] = moved[-1, -1]
    moved[:, :20] = moved[-1, -1]
    misplaced = fill_metrics(example.source, example.prompt, moved)
    assert misplaced["fill_iou"] < good["fill_iou"] - 0.3


def test_wrong_colors_are_counted_wrong():
    example = fill_example(seed=1, index=0, resolution=64, palette="distinct")
    swapped = example.target.copy()
    flat = np.full_like(swapped, CSS_COLORS["black" if not example.prompt.startswith("black") else "white"])
    scores = fill_metrics(example.source, example.prompt, flat)
    assert scores["circle_color_accuracy"] == 0.0
    assert scores["fill_iou"] < 0.5


def test_metric_resizes_condition_to_the_generated_image():
    example = fill_example(seed=0, index=4, resolution=128, palette="distinct")
    small = np.asarray(Image.fromarray(example.target).resize((64, 64), Image.NEAREST))
    assert fill_metrics(example.source, example.prompt, small)["fill_iou"] > 0.8


def test_registered_and_rejects_other_prompts():
    assert get_metric("fill") is fill_metrics
    example = fill_example(seed=0, index=0, resolution=32, palette="distinct")
    with pytest.raises(UserError, match="circle with"):
        fill_metrics(example.source, "a photo of a dog", example.target)


def test_eval_cli_recomputes_means_per_group(tmp_path, capsys):
    from zeroconv.evaluate.cli import main

    rows = []
    for i in range(3):
        example = fill_example(seed=2, index=i, resolution=64, palette="distinct")
        Image.fromarray(example.source).save(tmp_path / f"c{i}.png")
        Image.fromarray(example.target).save(tmp_path / f"good{i}.png")
        Image.fromarray(np.full_like(example.target, 128)).save(tmp_path / f"gray{i}.png")
        rows.append({"image": f"good{i}.png", "condition": f"c{i}.png", "prompt": example.prompt, "model": "good"})
        rows.append({"image": f"gray{i}.png", "condition": f"c{i}.png", "prompt": example.prompt, "model": "gray"})
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(tmp_path / "samples.jsonl"), "--metric", "fill", "--out", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "good" in table and "gray" in table and "fill_iou" in table
    means = json.loads((tmp_path / "m.json").read_text())
    assert means["good"]["fill_iou"] > 0.85 and means["good"]["count"] == 3
    assert means["gray"]["circle_color_accuracy"] == 0.0
    with pytest.raises(UserError, match="--metric"):
        main([str(tmp_path / "samples.jsonl")])
    with pytest.raises(UserError, match="no such samples file"):
        main([str(tmp_path / "missing.jsonl"), "--metric", "fill"])
