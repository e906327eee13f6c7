"""Control is learned, not just run (issue 13): after training on colored squares whose condition is the square's
mask, the held-out diffusion loss with the true conditions is below the loss with the conditions shuffled among
the samples, on the tiny SD and the tiny SDXL base. bench/control_learned.py prints the figures (and runs longer)."""

import pytest

from bench.control_learned import measure

STEPS = 60
MARGIN = 0.10


# Not yet measured: the machine this was written on had no CPU to spare for the 2 x 60 training steps. Run
# `PYTHONPATH=. python bench/control_learned.py --steps 60`, set MARGIN comfortably inside the gaps it prints
# (and STEPS lower if they are wide), then drop this skip.
@pytest.mark.skip(reason="margin not yet measured: run bench/control_learned.py --steps 60 first")
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_trained_controlnet_reads_its_condition(family, tmp_path):
    figures = measure(family, tmp_path, steps=STEPS, learning_rate=1e-3)
    assert figures["untrained_gap"] == 0.0  # an untrained ControlNet adds zero: which condition it gets is moot
    assert figures["true"] < figures["shuffled"] * (1 - MARGIN), figures
