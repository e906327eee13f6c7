import numpy as np

from zeroconv.data.conditions import get_extractor
from tests.data.conditions.photos import photo


def test_mask_covers_part_of_the_image_and_follows_the_rng():
    image = photo(64, 64, seed=7)
    extractor = get_extractor("inpaint", output="mask")
    masks = [np.asarray(extractor(image, np.random.default_rng(i)))[..., 0] for i in range(8)]
    for mask in masks:
        assert set(np.unique(mask)) <= {0, 255}
        assert 0 < (mask > 0).mean() < 1
    assert len({m.tobytes() for m in masks}) == 8
    again = np.asarray(extractor(image, np.random.default_rng(3)))[..., 0]
    assert np.array_equal(again, masks[3])


def test_masked_and_rgba_outputs_agree_with_the_mask():
    image = photo(64, 64, seed=8)
    rgb = np.asarray(image)
    mask = np.asarray(get_extractor("inpaint", output="mask")(image, np.random.default_rng(1)))[..., 0] > 0
    masked = np.asarray(get_extractor("inpaint", fill=0)(image, np.random.default_rng(1)))
    assert (masked[mask] == 0).all() and np.array_equal(masked[~mask], rgb[~mask])
    rgba = get_extractor("inpaint", output="rgba")(image, np.random.default_rng(1))
    assert rgba.mode == "RGBA"
    rgba = np.asarray(rgba)
    assert np.array_equal(rgba[..., 3] > 0, mask) and np.array_equal(rgba[..., :3], masked)
