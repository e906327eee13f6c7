"""zeroconv.train.validate.residuals_in: the ControlNet's residuals enter the denoiser in its dtype."""

import torch

from zeroconv.train.validate import residuals_in


class Residuals(torch.nn.Module):
    """Returns what a diffusers ControlNet returns: a tuple of down residuals and a mid residual, with an int."""

    def forward(self, x):
        return (x, x * 2), x + 1, torch.tensor(3)


def test_residuals_are_cast_to_a_bf16_denoisers_dtype_and_the_hook_is_removed():
    controlnet, denoiser = Residuals(), torch.nn.Linear(2, 2).to(torch.bfloat16)
    x = torch.ones(2)
    with residuals_in(controlnet, denoiser):
        (first, second), mid, count = controlnet(x)
    assert {first.dtype, second.dtype, mid.dtype} == {torch.bfloat16}
    assert count.dtype == torch.int64  # integer outputs are not residuals
    assert controlnet(x)[1].dtype == torch.float32  # the hook is gone after the block


def test_an_fp32_denoiser_takes_the_residuals_as_they_come():
    controlnet, denoiser = Residuals(), torch.nn.Linear(2, 2)
    with residuals_in(controlnet, denoiser):
        assert not controlnet._forward_hooks
        assert controlnet(torch.ones(2, dtype=torch.float16))[1].dtype == torch.float16
