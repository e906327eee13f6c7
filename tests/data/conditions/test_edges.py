import numpy as np

from zeroconv.data.conditions import get_extractor
from tests.data.conditions.photos import photo, square


def test_canny_marks_exactly_the_square_border():
    edges = np.asarray(get_extractor("canny")(square(64, 32)))
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    on = np.argwhere(edges[..., 0] > 0)
    # every edge pixel lies within one pixel of the square's outline (rows/cols 16 and 47)
    assert np.minimum(np.abs(on - 16), np.abs(on - 47)).min(1).max() <= 1
    assert edges[20:44, 20:44].sum() == 0 and edges[:8].sum() == 0


def test_random_thresholds_vary_per_draw_within_bounds_and_follow_the_rng():
    canny = get_extractor("canny", random_thresholds=True, low_min=20, low_max=150)
    draws = [canny.thresholds(np.random.default_rng(i)) for i in range(50)]
    assert len(set(draws)) > 20
    for low, high in draws:
        assert 20 <= low <= 150 and low + 50 <= high <= 255
    image = photo(64, 64, seed=3)
    maps = {np.asarray(canny(image, rng=np.random.default_rng(i))).tobytes() for i in range(10)}
    assert len(maps) > 1
    fixed = get_extractor("canny")
    assert len({np.asarray(fixed(image, rng=np.random.default_rng(i))).tobytes() for i in range(5)}) == 1


def test_scribble_strokes_are_thicker_than_canny_and_width_comes_from_rng():
    image = square(96, 48)
    thin = (np.asarray(get_extractor("canny")(image))[..., 0] > 0).sum()
    widths = []
    for seed in range(6):
        scribble = np.asarray(get_extractor("scribble", width_min=2, width_max=8)(image, np.random.default_rng(seed)))
        widths.append((scribble[..., 0] > 0).sum())
    assert min(widths) > thin
    assert len(set(widths)) > 1


def test_softedge_responds_at_the_step_and_is_zero_on_flat_regions():
    soft = np.asarray(get_extractor("softedge")(square(64, 32)))[..., 0].astype(int)
    assert soft[:, 14:19].max() == 255 or soft[14:19, :].max() == 255
    assert soft[28:36, 28:36].max() == 0 and soft[:4, :4].max() == 0


def test_lineart_draws_white_lines_on_black_at_the_outline():
    line = np.asarray(get_extractor("lineart")(square(64, 32)))[..., 0]
    assert line[:6, :6].max() == 0 and line[28:36, 28:36].max() == 0
    assert line[14:19, 20:44].max() > 128
