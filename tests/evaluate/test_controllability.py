import numpy as np
import pytest

from zeroconv.data.conditions import get_extractor
from zeroconv.evaluate import controllability
from zeroconv.evaluate.metrics import METRICS, get_metric
from tests.data.conditions.photos import photo
from tests.data.conditions.tiny_models import tiny_depth_model, tiny_segmentation_model

MODEL_FREE = ["canny", "scribble", "softedge", "lineart", "grayscale", "blur", "palette"]
SCORE = {"canny": "edge_f1", "scribble": "edge_f1", "softedge": "ssim", "lineart": "ssim", "grayscale": "ssim",
         "blur": "ssim", "palette": "ssim"}


def condition_of(name, image, **options):
    return np.asarray(get_extractor(name, **options)(image, rng=np.random.default_rng(0)))


@pytest.mark.parametrize("name", MODEL_FREE)
def test_the_source_image_scores_better_than_an_unrelated_one(name):
    source, other = photo(96, 96, seed=1), photo(96, 96, seed=50)
    condition = condition_of(name, source)
    metric = get_metric(name)
    matched = metric(condition, "a prompt", np.asarray(source))
    unrelated = metric(condition, "a prompt", np.asarray(other))
    assert all(isinstance(v, float) for v in matched.values())
    assert matched[SCORE[name]] > unrelated[SCORE[name]] + 0.05
    if name in ("canny", "grayscale", "blur", "palette", "softedge", "lineart"):
        assert matched[SCORE[name]] > 0.99  # re-extracting from the very source gives the condition back


def test_edge_scores_count_tolerance_and_empty_maps():
    expected = np.zeros((20, 20), bool)
    expected[10, 2:18] = True
    shifted = np.roll(expected, 1, axis=0)
    assert controllability.edge_scores(expected, shifted, 1, 1)["edge_f1"] == 1.0
    assert controllability.edge_scores(expected, np.roll(expected, 3, axis=0), 1, 1)["edge_f1"] == 0.0
    assert controllability.edge_scores(expected & False, expected & False, 1, 1)["edge_f1"] == 1.0


def test_generated_images_of_another_size_are_resized():
    source = photo(64, 64, seed=2)
    condition = condition_of("grayscale", source)
    scores = get_metric("grayscale")(condition, "", np.asarray(source.resize((128, 128))))
    assert scores["ssim"] > 0.8


def test_depth_and_segmentation_metrics_with_tiny_models(tmp_path):
    controllability.set_metric_model("depth", str(tiny_depth_model(tmp_path / "depth")))
    controllability.set_metric_model("segmentation", str(tiny_segmentation_model(tmp_path / "seg")))
    source, other = photo(48, 48, seed=3), photo(48, 48, seed=4)
    depth = np.asarray(get_extractor("depth", model=str(tmp_path / "depth"))(source))
    same = get_metric("depth")(depth, "", np.asarray(source))
    assert same["depth_rmse"] < 1e-6
    assert 0 <= get_metric("depth")(depth, "", np.asarray(other))["depth_rmse"] <= 1
    seg = np.asarray(get_extractor("segmentation", model=str(tmp_path / "seg"))(source))
    assert get_metric("segmentation")(seg, "", np.asarray(source)) == {"miou": 1.0, "pixel_accuracy": 1.0}
    assert 0 <= get_metric("segmentation")(seg, "", np.asarray(other))["miou"] <= 1


def test_every_condition_with_a_metric_is_registered():
    for name in MODEL_FREE + ["depth", "segmentation"]:
        assert METRICS[name].startswith("zeroconv.evaluate.controllability:")
