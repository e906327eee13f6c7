"""bench/recipe.py, the recipe study of issue 18: each recipe's flags reach the demo's training, and a finished
run is reused, not repeated. The study's figures come from the demo's own summary (tests/test_demo.py)."""

import json
import shlex

from bench.recipe import demo_command, main


def test_a_recipe_splits_into_the_demos_options_and_its_train_flags(tmp_path):
    command = demo_command("--proportion_empty_prompts 0.5 --timestep_sampling cubic --use_ema", 3, tmp_path, 400)
    assert command[command.index("--proportion_empty_prompts") + 1] == "0.5"  # the demo's own option
    assert shlex.split(command[command.index("--train_flags") + 1]) == ["--timestep_sampling", "cubic", "--use_ema"]
    assert command[command.index("--seed") + 1] == "3" and command[command.index("--max_train_steps") + 1] == "400"
    assert "--train_flags" not in demo_command("--condition_encoder_init paper", 0, tmp_path, 800)


def test_the_study_runs_each_recipe_once_and_tables_it(tmp_path, capsys):
    work = tmp_path / "study"
    small = "--train_examples 8 --held_out 2 --train_batch_size 2 --inference_steps 2 --validation_steps 2 " \
            "--lr_warmup_steps 0"
    argv = ["--work", str(work), "--seeds", "0", "--recipes", "cubic", "--score_steps", "2", "4",
            "--demo_flags", small, "--json", str(tmp_path / "figures.json")]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| cubic |" in table and "@2" in table and "@4" in table
    saved = (work / "cubic" / "seed0" / "controlnet" / "config.yaml").read_text()
    assert "timestep_sampling: cubic" in saved  # the recipe's flag reached `zeroconv train`
    figures = json.loads((tmp_path / "figures.json").read_text())["results"]["cubic"]["0"]
    summary = json.loads((work / "cubic" / "seed0" / "summary.json").read_text())
    assert figures["fill_iou"]["4"] == summary["history"][-1]["fill_iou"]

    stamp = (work / "cubic" / "seed0" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 0  # the same command again: the finished run is reused
    assert (work / "cubic" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
