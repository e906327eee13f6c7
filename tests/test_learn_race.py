"""bench/learn_race.py's bookkeeping (the races themselves take hours; their figures are in bench/RESULTS.md)."""

from bench.learn_race import split_init


def test_a_variant_naming_an_init_starts_from_that_init_and_train_never_sees_the_flag():
    flags, init = split_init(["--use_ema", "--condition_encoder_init", "unit_variance", "--snr_gamma", "5"])
    assert init == "unit_variance" and flags == ["--use_ema", "--snr_gamma", "5"]
    assert split_init(["--use_ema"]) == (["--use_ema"], "paper")  # the peer's start, as from_unet builds it
