"""Shared fixtures: tiny seeded SD bases and datasets, built once per session in a temp folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's OpenMP workers spin while waiting; with subprocess tests sharing two cores that costs up to 10x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_latent_cache_root(tmp_path_factory):
    """`zeroconv train` caches latents by default under $XDG_CACHE_HOME; tests keep theirs out of the home folder."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    from zeroconv.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"), prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_base_v(tmp_path_factory):
    from zeroconv.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny_base_v"), prediction_type="v_prediction", flavor="sd21")


@pytest.fixture(scope="session")
def tiny_sdxl_base(tmp_path_factory):
    from zeroconv.testing import make_tiny_sdxl_base

    return make_tiny_sdxl_base(tmp_path_factory.mktemp("tiny_sdxl_base"))


@pytest.fixture(scope="session")
def tiny_flux_base(tmp_path_factory):
    from zeroconv.testing import make_tiny_flux_base

    return make_tiny_flux_base(tmp_path_factory.mktemp("tiny_flux_base"))


@pytest.fixture(scope="session")
def tiny_sd3_base(tmp_path_factory):
    from zeroconv.testing import make_tiny_sd3_base

    return make_tiny_sd3_base(tmp_path_factory.mktemp("tiny_sd3_base"))


@pytest.fixture(scope="session")
def tiny_sd3_base_without_t5(tmp_path_factory):
    from zeroconv.testing import make_tiny_sd3_base

    return make_tiny_sd3_base(tmp_path_factory.mktemp("tiny_sd3_base_no_t5"), t5=False)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from zeroconv.testing import make_image_dataset

    return make_image_dataset(tmp_path_factory.mktemp("tiny_data"), n=32, size=64, layout="imagefolder")
