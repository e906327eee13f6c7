import json

from PIL import Image


def test_quick_demo_writes_scores_grid_and_curve_that_eval_recomputes(tmp_path, capsys):
    from accelerate.state import AcceleratorState, GradientState

    from zeroconv.demo import main
    from zeroconv.evaluate.cli import read_samples, score_samples

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = tmp_path / "demo"
    assert main(["--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "base alone" in printed and "ControlNet @ 4" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert [row["step"] for row in summary["history"]] == [2, 4]
    assert set(summary["baseline"]) == {"fill_iou", "circle_color_accuracy", "background_color_accuracy"}
    assert summary["control_step"] is None or summary["control_step"] in (2, 4)

    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 4 * 64 * 2  # condition | base alone | ControlNet | target, at twice the size
    assert Image.open(out / "curve.png").size == (640, 400)
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert any((out / "cache").iterdir())  # trained from cached latents and text embeddings

    from zeroconv.report import read_run

    page = (out / "report.html").read_text()  # the page of `zeroconv report`, written by the demo itself
    assert 'id="slider-0" min="0" max="2"' in page and "still training" not in page
    assert [step for step, _ in read_run(out).grids] == [0, 2, 4]  # the base alone, then every validation

    # every reported figure comes back from the saved images
    means = score_samples(read_samples(out / "samples.jsonl"))
    assert abs(means["base"]["fill_iou"] - summary["baseline"]["fill_iou"]) < 1e-9
    assert abs(means["controlnet-step-000004"]["fill_iou"] - summary["history"][-1]["fill_iou"]) < 1e-9


def test_train_flags_cannot_move_what_the_demo_sets(tmp_path):
    import pytest

    from zeroconv.demo import main
    from zeroconv.errors import UserError

    with pytest.raises(UserError, match="--max_train_steps is the demo's to set; use the demo's own --max_train_steps"):
        main(["--output_dir", str(tmp_path / "demo"), "--train_flags", "--max_train_steps 5"])
    assert not (tmp_path / "demo").exists()  # refused before any data is written
