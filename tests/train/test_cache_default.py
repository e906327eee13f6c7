"""--cache auto, the default: a latent cache whenever the run can use one, and a clean fall-back where it cannot."""

import logging

import pytest

from tests.train.helpers import losses, run_training, tiny_config
from zeroconv.config import TrainConfig
from zeroconv.errors import UserError


def fill_disk(monkeypatch, root):
    """The disk under `root` reports 1 KiB free (shutil is one module: other paths keep their real figure)."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1024) if str(path).startswith(str(root)) else real(path))


def cache_notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "--cache auto" in r.getMessage()]


def test_the_default_builds_a_cache_and_says_how_big(tiny_base, tiny_dataset, tmp_path, caplog):
    assert TrainConfig().cache == "auto"
    root = tmp_path / "caches"
    with caplog.at_level(logging.INFO, logger="zeroconv"):
        assert run_training(tiny_config(tiny_base, tiny_dataset, tmp_path / "run", cache="auto",
                                        latent_cache_dir=str(root), max_train_steps=2)) == 0
    built = [r.getMessage() for r in caplog.records if "latent cache: building" in r.getMessage()]
    assert len(built) == 1 and "MiB" in built[0]
    assert len(list(root.glob("*/manifest.json"))) == 1
    assert not cache_notices(caplog)


@pytest.mark.parametrize("why", ["random_crop", "aspect_buckets", "full_disk", "read_only"])
def test_auto_falls_back_to_live_encoding_with_one_notice(tiny_base, tiny_dataset, tmp_path, caplog, monkeypatch, why):
    root = tmp_path / "caches"
    flags = dict(cache="auto", latent_cache_dir=str(root), max_train_steps=2)
    if why == "random_crop":
        flags["random_crop"] = True
    elif why == "aspect_buckets":
        flags["aspect_buckets"] = "default"
    elif why == "full_disk":
        fill_disk(monkeypatch, root)
    else:  # sysfs refuses new folders even to root, where a chmod'ed folder would not
        flags["latent_cache_dir"] = "/sys/zeroconv-test-cache"
    with caplog.at_level(logging.INFO, logger="zeroconv"):
        assert run_training(tiny_config(tiny_base, tiny_dataset, tmp_path / "run", **flags)) == 0
    notices = cache_notices(caplog)
    assert len(notices) == 1, notices
    expected = {"random_crop": "--random_crop", "aspect_buckets": "--aspect_buckets", "full_disk": "MiB free", "read_only": "not writable"}[why]
    assert expected in notices[0]
    assert len(losses(tmp_path / "run")) == 2  # trained, uncached
    assert not list(root.glob("*/manifest.json")) and not list(root.glob("*.partial"))


def test_cache_on_makes_the_same_cases_an_error_naming_the_flag(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    fill_disk(monkeypatch, tmp_path / "caches")
    with pytest.raises(UserError, match=r"--cache on: the latent cache cannot be built: it needs about .* MiB free"):
        run_training(tiny_config(tiny_base, tiny_dataset, tmp_path / "run", cache="on",
                                 latent_cache_dir=str(tmp_path / "caches"), max_train_steps=2))
