"""bench/recipe.py, the recipe study of issue 18: each recipe's flags reach the demo's training, and a finished
run is reused, not repeated. The study's figures come from the demo's own summary (tests/test_demo.py)."""

import json
import shlex

from bench.recipe import demo_command, main
from zeroconv.config import parse
from zeroconv.demo import DemoConfig


def demo_options(command: list[str]) -> DemoConfig:
    """The demo's config from `command` ([python, -m, zeroconv, demo, ...]), read by the demo's own parser."""
    assert command[1:4] == ["-m", "zeroconv", "demo"]
    return parse(DemoConfig, command[4:], prog="zeroconv demo")


def test_a_recipe_splits_into_the_demos_options_and_its_train_flags(tmp_path):
    cfg = demo_options(demo_command("--proportion_empty_prompts 0.5 --timestep_sampling cubic --use_ema", 3,
                                    tmp_path, 400))
    assert cfg.proportion_empty_prompts == 0.5  # the demo's own option
    assert shlex.split(cfg.train_flags) == ["--timestep_sampling", "cubic", "--use_ema"]
    assert (cfg.seed, cfg.max_train_steps) == (3, 400)
    assert demo_options(demo_command("--condition_encoder_init paper", 0, tmp_path, 800)).train_flags == ""
    # a recipe of flags without values: the demo's parser must not take "--use_ema" for an option of its own
    assert demo_options(demo_command("--use_ema", 0, tmp_path, 800)).train_flags == "--use_ema"


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
