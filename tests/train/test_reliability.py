"""Runs that survive kills, bad data and NaNs, and resume exactly (issue 4). Each test can fail."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.helpers import controlnet_weights, losses, run_training, tiny_config
from zeroconv.errors import EXIT_NONFINITE
from zeroconv.train.checkpoint import find_resume_checkpoint

REPO = Path(__file__).resolve().parents[2]


def cli_args(cfg) -> list[str]:
    args = []
    for key, value in vars(cfg).items():
        if value is None or value == []:  # unset; a flag of one or more values given none is a usage error
            continue
        args.append(f"--{key}")
        args += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return args


def start_trainer(cfg, **env) -> subprocess.Popen:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "zeroconv", "train", *cli_args(cfg)], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_resume_mid_epoch_is_bit_identical(tiny_base, tiny_dataset, tmp_path):
    # batch 3 over 32 examples: 11 batches an epoch; with accumulation 2 the step-4 checkpoint sits mid-epoch
    common = dict(train_batch_size=3, gradient_accumulation_steps=2, dataloader_num_workers=2, random_flip=True,
                  checkpointing_steps=4)
    straight = tmp_path / "straight"
    assert run_training(tiny_config(tiny_base, tiny_dataset, straight, max_train_steps=8, **common)) == 0
    resumed = tmp_path / "resumed"
    assert run_training(tiny_config(tiny_base, tiny_dataset, resumed, max_train_steps=4, **common)) == 0
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (0, 8)  # mid-epoch indeed
    assert run_training(tiny_config(tiny_base, tiny_dataset, resumed, max_train_steps=8,
                                    resume_from_checkpoint="latest", **common)) == 0

    a, b = controlnet_weights(straight), controlnet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(straight / "checkpoint-8" / "optimizer.pt", weights_only=False)["state"]
    opt_b = torch.load(resumed / "checkpoint-8" / "optimizer.pt", weights_only=False)["state"]
    assert all(torch.equal(opt_a[i][name], opt_b[i][name]) for i in opt_a for name in ("exp_avg", "exp_avg_sq"))
    assert losses(straight) == losses(resumed)
    assert len(losses(straight)) == 8


def test_sigkill_while_saving_keeps_previous_checkpoint(tiny_base, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_base, tiny_dataset, out, max_train_steps=6, checkpointing_steps=2,
                      checkpoints_total_limit=1)
    proc = start_trainer(cfg, ZEROCONV_TEST_SLOW_CHECKPOINT="3")
    try:
        wait_for(lambda: (out / "checkpoint-2" / "COMPLETE").is_file())
        wait_for(lambda: any(out.glob(".checkpoint-4.tmp-*")))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert any(out.glob(".checkpoint-4.tmp-*"))  # the save really was cut in the middle
    assert not (out / "checkpoint-4").exists()
    assert find_resume_checkpoint(out, "latest") == out / "checkpoint-2"  # limit 1 kept the only good one

    cfg = tiny_config(tiny_base, tiny_dataset, out, max_train_steps=6, checkpointing_steps=2,
                      checkpoints_total_limit=1, resume_from_checkpoint="latest")
    assert run_training(cfg) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert not any(out.glob(".checkpoint-*.tmp-*"))  # the half-written folder was cleaned up
    assert min(step for step in losses(out) if step > 2) == 3  # resumed at step 2, never from the partial one


def test_explicit_missing_checkpoint_is_an_error(tiny_base, tiny_dataset, tmp_path):
    from zeroconv.errors import UserError

    with pytest.raises(UserError, match="no such checkpoint"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-99"))
    assert find_resume_checkpoint(tmp_path, "latest") is None


def test_resume_refuses_different_resolution(tiny_base, tiny_dataset, tmp_path):
    from zeroconv.errors import UserError

    out = tmp_path / "run"
    assert run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=2, checkpointing_steps=2)) == 0
    with pytest.raises(UserError, match="resolution"):
        run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=4, resolution=128,
                                 resume_from_checkpoint="latest"))


def nan_at(steps):
    """compute_loss that returns NaN while computing the given (1-based) steps."""
    from zeroconv.train import loop

    original = loop.compute_loss

    def patched(t, batch):
        loss = original(t, batch)
        return loss * float("nan") if t.state.global_step + 1 in steps else loss

    return patched


def test_nan_step_leaves_weights_unchanged(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    from zeroconv.train import loop

    monkeypatch.setattr(loop, "compute_loss", nan_at({3}))
    out = tmp_path / "run"
    assert run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=4, checkpointing_steps=1)) == 0
    w2, w3, w4 = (controlnet_weights(out / f"checkpoint-{s}") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["nonfinite_log"] == [3]


def test_nans_in_a_row_stop_the_run(tiny_base, tiny_dataset, tmp_path, monkeypatch, caplog):
    from zeroconv.train import loop

    monkeypatch.setattr(loop, "compute_loss", nan_at(set(range(3, 100))))
    out = tmp_path / "run"
    cfg = tiny_config(tiny_base, tiny_dataset, out, max_train_steps=20, checkpointing_steps=1000,
                      max_nonfinite_steps=3)
    assert run_training(cfg) == EXIT_NONFINITE
    assert "step 5" in caplog.text and "non-finite" in caplog.text
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["nonfinite_in_a_row"] == 3 and state["nonfinite_log"] == [3, 4, 5]
    # the stop checkpoint holds the last good weights: those of a clean two-step run
    monkeypatch.undo()
    clean = tmp_path / "clean"
    assert run_training(tiny_config(tiny_base, tiny_dataset, clean, max_train_steps=2)) == 0
    stopped, good = controlnet_weights(out / "checkpoint-5"), controlnet_weights(clean)
    assert all(torch.equal(stopped[k], good[k]) for k in good)


def test_corrupt_files_are_skipped_and_counted(tiny_base, tmp_path):
    from zeroconv.testing import make_image_dataset

    data = make_image_dataset(tmp_path / "data", n=16, size=64)
    (data / "0003.png").write_bytes(b"")  # zero bytes
    (data / "0007.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # truncated
    (data / "conditioning" / "0011.png").write_text("not an image")
    out = tmp_path / "run"
    assert run_training(tiny_config(tiny_base, data, out, max_train_steps=8)) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 8
    assert summary["skipped_samples"] >= 3  # 8 steps x 4 = two epochs over 16 examples: each bad one seen


def test_strict_data_stops_on_corrupt_file(tiny_base, tmp_path):
    from zeroconv.errors import UserError
    from zeroconv.testing import make_image_dataset

    data = make_image_dataset(tmp_path / "data", n=8, size=64)
    (data / "0002.png").write_bytes(b"")
    with pytest.raises(UserError, match="0002.png"):
        run_training(tiny_config(tiny_base, data, tmp_path / "run", max_train_steps=4, strict_data=True))


def test_sigterm_checkpoints_and_resumes_to_same_result(tiny_base, tiny_dataset, tmp_path):
    straight = tmp_path / "straight"
    assert run_training(tiny_config(tiny_base, tiny_dataset, straight, max_train_steps=40)) == 0

    out = tmp_path / "interrupted"
    cfg = tiny_config(tiny_base, tiny_dataset, out, max_train_steps=40)
    proc = start_trainer(cfg)
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    checkpoint = find_resume_checkpoint(out, "latest")
    stopped_at = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 3 <= stopped_at < 40
    assert run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=40,
                                    resume_from_checkpoint="latest")) == 0
    a, b = controlnet_weights(straight), controlnet_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_errors_never_kill_training(tiny_base, tiny_dataset, tmp_path, caplog):
    calls = []

    def failing_evaluator(step, pipe):
        calls.append(step)
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        raise RuntimeError("metric exploded")

    out = tmp_path / "run"
    cfg = tiny_config(tiny_base, tiny_dataset, out, max_train_steps=4, validation_steps=2)
    assert run_training(cfg, evaluator=failing_evaluator) == 0
    assert calls == [0, 2, 4]  # the baseline, then every validation_steps
    assert "validation at step 2 failed" in caplog.text and "OutOfMemoryError" in caplog.text
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 4
