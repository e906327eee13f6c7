"""The learning-speed options of issue 18 in a real run: --use_ema, --snr_gamma, --timestep_sampling."""

import json

import torch

from tests.train.helpers import controlnet_weights, losses, run_training, tiny_config


def test_ema_resume_is_bit_identical_and_final_save_holds_the_average(tiny_base, tiny_dataset, tmp_path):
    common = dict(use_ema=True, ema_decay=0.9, learning_rate=1e-3, checkpointing_steps=3, train_batch_size=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_training(tiny_config(tiny_base, tiny_dataset, straight, max_train_steps=6, **common)) == 0
    assert run_training(tiny_config(tiny_base, tiny_dataset, resumed, max_train_steps=3, **common)) == 0
    assert run_training(tiny_config(tiny_base, tiny_dataset, resumed, max_train_steps=6,
                                    resume_from_checkpoint="latest", **common)) == 0
    for folder in ("checkpoint-6/controlnet", "checkpoint-6/controlnet_ema", ".", "without_ema"):
        a, b = controlnet_weights(straight / folder), controlnet_weights(resumed / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    assert losses(straight) == losses(resumed)
    state = json.loads((resumed / "checkpoint-6" / "controlnet_ema" / "ema_state.json").read_text())
    assert state["optimization_step"] == 6

    average, trained = controlnet_weights(straight), controlnet_weights(straight / "without_ema")
    assert all(torch.equal(trained[k], controlnet_weights(straight / "checkpoint-6/controlnet")[k]) for k in trained)
    moved = [k for k in trained if not torch.equal(average[k], trained[k])]
    assert moved  # output_dir is the average, not a copy of the trained weights
    # the average lies between the start and the trained weights on a zero convolution that moved from 0
    key = next(k for k in moved if k.startswith("controlnet_mid_block.weight"))
    assert 0 < float(average[key].abs().sum()) < float(trained[key].abs().sum())

    from zeroconv.models.families import get_family
    from zeroconv.models.pipeline import load_controlnet

    sampled = load_controlnet(str(straight / "checkpoint-6"), get_family("sd")).state_dict()  # a checkpoint samples its average
    ema_file = controlnet_weights(straight / "checkpoint-6/controlnet_ema")
    assert all(torch.equal(sampled[k], ema_file[k]) for k in ema_file)


def test_resuming_without_ema_state_with_use_ema_is_a_clear_error(tiny_base, tiny_dataset, tmp_path):
    import pytest

    from zeroconv.errors import UserError

    out = tmp_path / "run"
    assert run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=2, checkpointing_steps=2)) == 0
    with pytest.raises(UserError, match="without --use_ema"):
        run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=4, use_ema=True,
                                 resume_from_checkpoint="latest"))


def test_snr_gamma_and_timestep_sampling_change_the_loss_but_train(tiny_base, tiny_dataset, tmp_path):
    plain = tmp_path / "plain"  # the paper's step
    assert run_training(tiny_config(tiny_base, tiny_dataset, plain, max_train_steps=3, timestep_sampling="uniform")) == 0
    runs = {"snr": dict(snr_gamma=5.0, timestep_sampling="uniform"), "cubic": dict(timestep_sampling="cubic"),
            "logit_normal": dict(timestep_sampling="logit_normal")}
    for name, flags in runs.items():
        out = tmp_path / name
        assert run_training(tiny_config(tiny_base, tiny_dataset, out, max_train_steps=3, **flags)) == 0
        assert losses(out).keys() == losses(plain).keys()
        assert losses(out) != losses(plain), name  # the option reached the step
        assert all(torch.isfinite(torch.tensor(v)) for v in losses(out).values())


def test_cubic_then_uniform_trains_as_cubic_until_the_switch_and_resumes_exactly(tiny_base, tiny_dataset, tmp_path):
    curriculum = dict(timestep_sampling="cubic_then_uniform", timestep_switch_fraction=0.5, checkpointing_steps=2)
    cubic, straight, resumed = tmp_path / "cubic", tmp_path / "straight", tmp_path / "resumed"
    assert run_training(tiny_config(tiny_base, tiny_dataset, cubic, timestep_sampling="cubic")) == 0
    assert run_training(tiny_config(tiny_base, tiny_dataset, straight, **curriculum)) == 0
    first, second = losses(cubic), losses(straight)
    assert [first[s] for s in (1, 2)] == [second[s] for s in (1, 2)]  # steps 1-2 of 4: cubic's
    assert first[3] != second[3]  # then uniform's draws
    # stopped after step 2 (its checkpoint, as a stopped run leaves it) and resumed: the switch is where it was,
    # from --max_train_steps and the step reached, so the uniform steps 3-4 draw as in the straight run
    import shutil

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert run_training(tiny_config(tiny_base, tiny_dataset, resumed, resume_from_checkpoint="latest",
                                    **curriculum)) == 0
    assert {s: v for s, v in losses(resumed).items() if s > 2} == {s: second[s] for s in (3, 4)}
    a, b = controlnet_weights(straight), controlnet_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
