"""Training on several processes (issue 16, part): `accelerate launch` with 2 CPU processes (gloo) trains,
checkpoints with every rank taking part, and a 2-process checkpoint resumed on 2 processes ends bit-identical to the
uninterrupted 2-process run; every sample is read exactly once per epoch across ranks and loader workers. DeepSpeed
and FSDP: tests/train/test_engines.py."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.train.helpers import controlnet_weights, losses

REPO = Path(__file__).resolve().parents[2]
DDP_CONFIG = REPO / "configs" / "accelerate" / "ddp.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(base, data, out, steps, *extra, env=None, check=True, config=DDP_CONFIG, module="zeroconv"):
    """`accelerate launch` with a shipped config (DDP unless told) and 2 processes on this CPU: torchrun
    underneath, and ACCELERATE_USE_CPU=1, without which accelerate leaves each process alone (check_launch refuses
    that). `module` is what runs in place of `python -m zeroconv`."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [accelerate, "launch", "--config_file", str(config), "--num_processes", "2",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", module, "train", "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data),
               "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-4",
               "--lr_warmup_steps", "0", "--seed", "7", "--max_train_steps", str(steps), "--checkpointing_steps", "2",
               "--validation_steps", "1000", "--report_to", "none", "--logging_steps", "1", "--cache", "off", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_USE_CPU": "1", **(env or {})}
    env = {key: value for key, value in env.items() if value is not None}  # None: unset
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_train_checkpoint_and_resume_exactly(tiny_base, tiny_dataset, tmp_path, ddp_four_steps):
    straight, resumed = ddp_four_steps, tmp_path / "resumed"  # with --use_ema, as ddp_four_steps
    launch_two(tiny_base, tiny_dataset, resumed, 2, "--use_ema")
    assert (resumed / "checkpoint-2" / "COMPLETE").is_file()
    launch_two(tiny_base, tiny_dataset, resumed, 4, "--use_ema", "--resume_from_checkpoint", "latest")
    for folder in (".", "without_ema"):  # the average and the trained weights
        a, b = controlnet_weights(straight / folder), controlnet_weights(resumed / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    import json

    summary = json.loads((straight / "train_summary.json").read_text())
    assert (summary["processes"], summary["effective_batch"]) == (2, 4)  # 2 per process x 2 processes


def test_two_processes_at_half_the_batch_train_the_model_of_one_process(tiny_base, tiny_dataset, tmp_path,
                                                                       ddp_four_steps):
    """Every sample draws its noise, timestep and posterior from (seed, step, index), and DDP averages the two
    halves' gradients: 2 processes x batch 2 is the step of 1 process x batch 4, to float rounding."""
    from tests.train.helpers import run_training, tiny_config

    two, one = ddp_four_steps, tmp_path / "one"
    assert run_training(tiny_config(tiny_base, tiny_dataset, one, train_batch_size=4, max_train_steps=4, seed=7,
                                    learning_rate=1e-4, checkpointing_steps=2)) == 0
    a, b = controlnet_weights(two / "without_ema"), controlnet_weights(one)  # the trained weights (two: --use_ema)
    moved = [k for k in a if not torch.equal(a[k], controlnet_weights(two / "checkpoint-2")[k])]
    assert moved  # the weights trained on, so agreeing is not the trivial agreement of untouched copies
    # atol lr / 10: where a gradient is the size of AdamW's eps (1e-8), its update lr * g / (|g| + eps) turns a
    # last-bit difference of the all-reduce's summation order into a part of lr (1.3e-6 seen on one weight of 2,304,
    # as bench/step_compare.py shows against the peer); a step on other samples or draws differs by about lr
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    two_losses, one_losses = losses(two), losses(one)
    assert two_losses.keys() == one_losses.keys() == {1, 2, 3, 4}
    assert all(two_losses[s] == pytest.approx(one_losses[s], rel=1e-5) for s in two_losses)  # the mean of both ranks


def test_only_mid_control_trains_on_two_processes(tiny_base, tiny_dataset, tmp_path):
    """The down-block zero convs get no gradient under --only_mid_control; DDP stopped at the second step ("Expected
    to have finished reduction in the prior iteration") until it was told to expect unused parameters."""
    out = tmp_path / "mid"
    launch_two(tiny_base, tiny_dataset, out, 3, "--only_mid_control", "true")
    weights, start = controlnet_weights(out), controlnet_weights(out / "checkpoint-2")
    assert len(losses(out)) == 3
    assert not torch.equal(weights["controlnet_mid_block.weight"], start["controlnet_mid_block.weight"])
    assert all(torch.count_nonzero(v) == 0 for k, v in weights.items() if k.startswith("controlnet_down_blocks"))


def test_unlocked_decoder_trains_on_two_processes_with_accumulation(tiny_base, tiny_dataset, tmp_path):
    """--sd_locked false wraps the UNet in DDP too; reading its dtype off the wrapper stopped the first step
    ("'DistributedDataParallel' object has no attribute 'dtype'") until the dtype was read from a parameter."""
    out = tmp_path / "unlocked"
    launch_two(tiny_base, tiny_dataset, out, 2, "--sd_locked", "false", "--gradient_accumulation_steps", "2")
    assert len(losses(out)) == 2
    from safetensors.torch import load_file

    decoder = load_file(out / "checkpoint-2" / "unet_decoder.safetensors")
    from zeroconv.models.base import load_base

    original = load_base(str(tiny_base)).unet.state_dict()
    assert any(not torch.equal(value, original[key]) for key, value in decoder.items())  # the decoder trained


@pytest.mark.parametrize("sd_locked, held", [(True, ["controlnet"]), (False, ["controlnet", "unet"])])
def test_every_trained_module_syncs_once_per_step(sd_locked, held):
    """A micro-batch that is not a step's last holds back the all-reduce of every module that trains: with
    --sd_locked false the UNet too (issue 16 item 6); entered and left together."""
    import contextlib

    from zeroconv.train.loop import held_back_sync

    events = []

    class FakeAccelerator:
        @contextlib.contextmanager
        def no_sync(self, module):
            events.append(("hold", module))
            yield
            events.append(("release", module))

    t = SimpleNamespace(cfg=SimpleNamespace(sd_locked=sd_locked), controlnet="controlnet", unet="unet",
                        accelerator=FakeAccelerator())
    with held_back_sync(t):
        assert [m for e, m in events if e == "hold"] == held and not any(e == "release" for e, _ in events)
    assert sorted(m for e, m in events if e == "release") == sorted(held)


@pytest.mark.parametrize("num_samples, world_size, batch_size, workers", [(12, 2, 3, 0), (12, 2, 2, 2), (16, 4, 2, 2)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(num_samples, world_size, batch_size, workers):
    from zeroconv.data.order import epoch_batches

    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return num_samples

        def __getitem__(self, index):
            return index

        def set_epoch(self, epoch):
            pass

    per_epoch = num_samples // (world_size * batch_size)
    seen = {epoch: [] for epoch in range(2)}
    for rank in range(world_size):
        state = SimpleNamespace(epoch=0, batches_in_epoch=0)
        batches = epoch_batches(Indices(), state, batch_size=batch_size, seed=3, num_workers=workers,
                                collate_fn=list, rank=rank, world_size=world_size)
        for epoch in range(2):
            for _ in range(per_epoch):
                seen[epoch] += next(batches)
    for epoch in range(2):
        assert sorted(seen[epoch]) == list(range(num_samples)), epoch
    assert seen[0] != seen[1]  # a new order each epoch


def test_launches_that_would_train_wrongly_are_refused_before_any_model_loads(tiny_base, tiny_dataset, tmp_path):
    from accelerate.utils import DistributedType

    from zeroconv.train.setup import check_launch

    for engine in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                   DistributedType.DEEPSPEED, DistributedType.FSDP):  # the engines run (tests/train/test_engines.py)
        check_launch(SimpleNamespace(distributed_type=engine, num_processes=1))
    # two processes on a CPU without ACCELERATE_USE_CPU: accelerate leaves each alone; both stop, nothing written
    result = launch_two(tiny_base, tiny_dataset, tmp_path / "alone", 2, env={"ACCELERATE_USE_CPU": None}, check=False)
    assert result.returncode != 0
    assert "2 processes were launched (WORLD_SIZE=2) but accelerate joined none of them" in result.stderr
    assert "Traceback" not in result.stderr.split("2 processes were launched")[0][-2000:]
    assert not (tmp_path / "alone" / "checkpoint-2").exists()


def test_processes_wait_ddp_timeout_minutes_at_a_collective(tiny_base, tiny_dataset, tmp_path):
    """The waiting ranks of a long validation get --ddp_timeout, not torch's 10-30 minutes."""
    from datetime import timedelta

    from accelerate.state import AcceleratorState, GradientState

    from tests.train.helpers import tiny_config
    from zeroconv.config import check_train_config
    from zeroconv.errors import UserError
    from zeroconv.train.setup import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = make_accelerator(tiny_config(tiny_base, tiny_dataset, tmp_path, ddp_timeout=7))
    assert accelerator.init_handler.timeout == timedelta(minutes=7)
    with pytest.raises(UserError, match="--ddp_timeout must be at least 1"):
        check_train_config(tiny_config(tiny_base, tiny_dataset, tmp_path, ddp_timeout=0))
