import pytest

from zeroconv.config import TrainConfig, build_parser, parse
from zeroconv.errors import UserError


def test_yaml_then_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1.0e-4\ntrain_batch_size: 8\nsd_locked: false\nvalidation_prompt: a cat\n")
    cfg = parse(TrainConfig, ["--config", str(config), "--train_batch_size", "2"], prog="zeroconv train")
    assert cfg.learning_rate == 1e-4 and cfg.train_batch_size == 2 and cfg.sd_locked is False
    assert cfg.validation_prompt == ["a cat"]


def test_bool_flags_take_optional_values():
    cfg = parse(TrainConfig, ["--gradient_checkpointing", "--sd_locked", "false", "--random_flip=true"], prog="t")
    assert cfg.gradient_checkpointing is True and cfg.sd_locked is False and cfg.random_flip is True


def test_peer_default_for_empty_prompts():
    # diffusers' script's 0, measured to learn the Fill task faster than the paper's 0.5 (bench/RESULTS.md)
    assert TrainConfig().proportion_empty_prompts == 0.0


def test_unknown_yaml_key_names_it_and_suggests(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 1\n")
    with pytest.raises(UserError, match="learning_rat.*did you mean learning_rate"):
        parse(TrainConfig, ["--config", str(config)], prog="t")


def test_bad_yaml_value_is_a_user_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train_batch_size: many\n")
    with pytest.raises(UserError, match="train_batch_size"):
        parse(TrainConfig, ["--config", str(config)], prog="t")


def test_every_option_has_help_with_default():
    parser = build_parser(TrainConfig, "zeroconv train")
    for action in parser._actions:
        if action.dest in ("help",):
            continue
        assert action.help and "(default" in action.help, action.dest


DIFFUSERS_FLAGS = """pretrained_model_name_or_path controlnet_model_name_or_path revision variant tokenizer_name
output_dir cache_dir seed resolution train_batch_size num_train_epochs max_train_steps checkpointing_steps
checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate scale_lr
lr_scheduler lr_warmup_steps lr_num_cycles lr_power use_8bit_adam dataloader_num_workers adam_beta1 adam_beta2
adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to
mixed_precision enable_xformers_memory_efficient_attention set_grads_to_none dataset_name dataset_config_name
train_data_dir image_column conditioning_image_column caption_column max_train_samples proportion_empty_prompts
validation_prompt validation_image num_validation_images validation_steps tracker_project_name""".split()


def test_accepts_every_flag_of_diffusers_train_controlnet():
    parser = build_parser(TrainConfig, "zeroconv train")
    known = {opt for action in parser._actions for opt in action.option_strings}
    missing = [flag for flag in DIFFUSERS_FLAGS if f"--{flag}" not in known]
    assert not missing


def test_optional_number_accepts_none_to_turn_an_option_off(capsys):
    import pytest

    from zeroconv.config import TrainConfig, parse

    assert parse(TrainConfig, ["--snr_gamma", "5"], prog="zeroconv train").snr_gamma == 5.0
    assert parse(TrainConfig, ["--snr_gamma", "none"], prog="zeroconv train").snr_gamma is None
    assert parse(TrainConfig, ["--max_train_steps", "None"], prog="zeroconv train").max_train_steps is None
    with pytest.raises(SystemExit):
        parse(TrainConfig, ["--snr_gamma", "five"], prog="zeroconv train")
    assert "invalid float value: 'five'" in capsys.readouterr().err
