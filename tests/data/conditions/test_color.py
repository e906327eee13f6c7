import numpy as np

from zeroconv.data.conditions import get_extractor
from tests.data.conditions.photos import photo


def test_palette_is_blocky_with_at_most_cells_squared_colors():
    image = photo(64, 64, seed=4)
    out = np.asarray(get_extractor("palette", cells=8)(image))
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= 64
    assert (out[:8, :8] == out[0, 0]).all()  # a 64 px image in 8 cells: 8x8 blocks of one color
    quantized = np.asarray(get_extractor("palette", cells=8, colors=4)(image))
    assert len(np.unique(quantized.reshape(-1, 3), axis=0)) <= 4


def test_grayscale_has_equal_channels_and_keeps_luma():
    image = photo(48, 40, seed=5)
    out = np.asarray(get_extractor("grayscale")(image))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0].astype(int) - np.asarray(image.convert("L")).astype(int)).max() <= 1


def test_blur_smooths_and_random_strength_follows_the_rng():
    image = photo(64, 64, seed=6)
    source = np.asarray(image).astype(float)
    blurred = np.asarray(get_extractor("blur", sigma=3.0)(image)).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).max() < 0.5 * np.abs(np.diff(source, axis=1)).max()
    random_blur = get_extractor("blur", sigma=1.0, sigma_max=6.0)
    outs = {np.asarray(random_blur(image, np.random.default_rng(i))).tobytes() for i in range(5)}
    assert len(outs) == 5
