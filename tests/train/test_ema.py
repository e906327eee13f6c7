"""zeroconv.train.ema on its own, without a run: its update is diffusers' EMAModel.step to the bit; weights an
engine holds in 16 bits (DeepSpeed ZeRO-2 under bf16) are averaged in float32; `applied` puts the average into a
whole ControlNet and gives its weights back. In real runs, on one process and DDP: tests/train/test_recipe.py and
tests/train/test_distributed.py; per shard under FSDP2: tests/train/test_engines.py."""

import copy

import torch

from zeroconv.train.ema import ControlNetEMA


def small_module(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)
    module[1].bias.requires_grad_(False)  # a frozen tensor: EMAModel copies it instead of averaging
    return module


def perturb(module: torch.nn.Module, step: int) -> None:
    with torch.no_grad():
        for i, param in enumerate(module.parameters()):
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(100 * step + i)) * 0.1)


def test_update_is_emamodel_step_to_the_bit():
    from diffusers.training_utils import EMAModel

    module = small_module()
    ours, theirs = ControlNetEMA(module, decay=0.9), EMAModel(module.parameters(), decay=0.9)
    for step in range(6):
        perturb(module, step)
        ours.update()
        theirs.step(module.parameters())
        assert ours.average.optimization_step == theirs.optimization_step
        assert ours.average.cur_decay_value == theirs.cur_decay_value
        assert all(torch.equal(a, b) for a, b in zip(ours.average.shadow_params, theirs.shadow_params)), step
    assert torch.equal(ours.average.shadow_params[-1], module[1].bias)  # frozen: copied, as EMAModel does


def test_16_bit_weights_are_averaged_in_float32():
    """DeepSpeed casts the live weights to bf16 under mixed precision (ZeRO-2 keeps them whole on every process):
    a bf16 average would not move by less than its rounding step, (1 - decay) x a change of one step here."""
    module = small_module(torch.bfloat16)
    ema = ControlNetEMA(module, decay=0.99)
    ema.average.optimization_step = 10_000  # past the warm-up: decay 0.99
    assert all(shadow.dtype == torch.float32 for shadow in ema.average.shadow_params)
    weight, start = module[0].weight, ema.average.shadow_params[0].clone()
    with torch.no_grad():
        weight.copy_(torch.nextafter(weight, torch.full_like(weight, 10)))  # one bf16 step up, everywhere
    ema.update()
    moved = ema.average.shadow_params[0] - start
    assert bool((moved > 0).all())
    assert torch.equal(start.to(torch.bfloat16) + moved.to(torch.bfloat16), start.to(torch.bfloat16))  # lost in bf16


def test_applied_puts_the_average_in_a_whole_copy_and_gives_its_weights_back():
    module = small_module()
    ema = ControlNetEMA(module, decay=0.9)
    for step in range(3):
        perturb(module, step)
        ema.update()
    whole = copy.deepcopy(module)  # as the main process's gathered copy, or the live module itself
    before = {k: v.clone() for k, v in whole.state_dict().items()}
    with ema.applied(whole) as averaged:
        assert averaged is whole
        assert all(torch.equal(p, s) for p, s in zip(whole.parameters(), ema.average.shadow_params))
        assert not torch.equal(whole[0].weight, before["0.weight"])
    assert all(torch.equal(v, before[k]) for k, v in whole.state_dict().items())  # bit for bit
    with ema.applied(None) as averaged:  # the processes other than the main one hold no whole copy
        assert averaged is None
