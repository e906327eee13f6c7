import subprocess
import sys

from zeroconv.cli import COMMANDS, main, resolve


def test_every_command_resolves_to_a_function():
    for name in COMMANDS:
        assert callable(resolve(name)), name


def test_unknown_command_suggests(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_python_dash_m_and_train_help():
    proc = subprocess.run([sys.executable, "-m", "zeroconv", "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--proportion_empty_prompts" in proc.stdout and "default: 0.0" in proc.stdout


def test_only_the_torchvision_notice_of_transformers_is_dropped(caplog):
    import logging

    from zeroconv.cli import quiet_torchvision_notice

    quiet_torchvision_notice()
    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to ...")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
