"""Fixtures of the training tests that cost a multi-process launch, made once per session."""

import pytest


@pytest.fixture(scope="session")
def ddp_four_steps(tiny_base, tiny_dataset, tmp_path_factory):
    """The output_dir of `launch_two`'s default run with --use_ema: 2 DDP processes, batch 2 each, 4 steps,
    checkpoints at 2 and 4; output_dir holds the average, without_ema/ the trained weights (the average changes
    nothing of training). Read only: several tests compare their own runs against it."""
    from tests.train.test_distributed import launch_two

    out = tmp_path_factory.mktemp("ddp_four_steps") / "out"
    launch_two(tiny_base, tiny_dataset, out, 4, "--use_ema")
    return out
