import numpy as np
import pytest

from zeroconv.data.conditions import EXTRACTORS, extractor_class, get_extractor
from zeroconv.errors import UserError
from tests.data.conditions.photos import photo

MODEL_FREE = [n for n in EXTRACTORS if n not in ("depth", "segmentation", "landmarks")]


def test_every_registered_name_resolves_to_an_extractor_class():
    for name in EXTRACTORS:
        assert callable(extractor_class(name))


@pytest.mark.parametrize("name", MODEL_FREE)
def test_model_free_extractors_keep_size_and_return_uint8_rgb(name):
    image = photo(72, 48, seed=1)
    condition = get_extractor(name, seed=0)(image, rng=np.random.default_rng(5))
    assert condition.size == image.size
    assert condition.mode == "RGB"


@pytest.mark.parametrize("name", MODEL_FREE)
def test_same_rng_same_condition_and_seeded_default_is_reproducible(name):
    image = photo(64, 64, seed=2)
    first = np.asarray(get_extractor(name)(image, rng=np.random.default_rng([3, 4])))
    again = np.asarray(get_extractor(name)(image, rng=np.random.default_rng([3, 4])))
    assert np.array_equal(first, again)
    a, b = get_extractor(name, seed=9), get_extractor(name, seed=9)
    for _ in range(3):
        assert np.array_equal(np.asarray(a(image)), np.asarray(b(image)))


def test_unknown_condition_suggests_the_close_name():
    with pytest.raises(UserError, match="did you mean 'canny'"):
        get_extractor("cany")


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(UserError, match=r"unknown option\(s\) lo; it accepts low=100"):
        get_extractor("canny", lo=5)


def test_command_line_option_text_is_coerced_to_the_option_type():
    extractor = get_extractor("canny", low="50", high="120", random_thresholds="true")
    assert (extractor.low, extractor.high, extractor.random_thresholds) == (50, 120, True)
    with pytest.raises(UserError, match="low='abc' should be a int"):
        get_extractor("canny", low="abc")


def test_invalid_option_values_are_user_errors():
    with pytest.raises(UserError, match="low <= high"):
        get_extractor("canny", low=200, high=100)
    with pytest.raises(UserError, match="output='x'"):
        get_extractor("inpaint", output="x")
