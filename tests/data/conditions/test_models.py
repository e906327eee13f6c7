import pickle

import numpy as np
import pytest

from zeroconv.data.conditions import get_extractor
from zeroconv.data.conditions.models import class_palette
from zeroconv.errors import UserError
from tests.data.conditions.photos import photo
from tests.data.conditions.tiny_models import tiny_depth_model, tiny_segmentation_model


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    return tiny_depth_model(tmp_path_factory.mktemp("depth"))


@pytest.fixture(scope="module")
def segmentation_model(tmp_path_factory):
    return tiny_segmentation_model(tmp_path_factory.mktemp("seg"), num_labels=5)


def test_depth_from_a_local_model_is_gray_full_range_and_input_sized(depth_model):
    image = photo(56, 40, seed=2)
    depth = np.asarray(get_extractor("depth", model=str(depth_model), device="cpu")(image))
    assert depth.shape == (40, 56, 3) and depth.dtype == np.uint8
    assert (depth[..., 0] == depth[..., 1]).all() and (depth[..., 1] == depth[..., 2]).all()
    assert depth.min() == 0 and depth.max() == 255


def test_segmentation_draws_only_the_fixed_class_colors(segmentation_model):
    extractor = get_extractor("segmentation", model=str(segmentation_model), device="cpu")
    image = photo(48, 48, seed=3)
    seg = np.asarray(extractor(image))
    assert seg.shape == (48, 48, 3)
    palette = {tuple(c) for c in class_palette(5)}
    assert {tuple(c) for c in np.unique(seg.reshape(-1, 3), axis=0)} <= palette
    assert np.array_equal(class_palette(5), class_palette(150)[:5])  # a class keeps its color
    assert len({tuple(c) for c in class_palette(150)}) == 150
    assert np.array_equal(np.asarray(extractor(image)), seg)


def test_model_extractors_pickle_without_their_pipeline(depth_model):
    extractor = get_extractor("depth", model=str(depth_model), device="cpu")
    extractor(photo(32, 32))
    clone = pickle.loads(pickle.dumps(extractor))
    assert clone._pipeline is None
    assert np.array_equal(np.asarray(clone(photo(32, 32))), np.asarray(extractor(photo(32, 32))))


def test_a_model_path_that_does_not_exist_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load it for depth-estimation"):
        get_extractor("depth", model=str(tmp_path / "nowhere"), device="cpu")(photo(32, 32))
