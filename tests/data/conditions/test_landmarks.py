import numpy as np
import pytest
from PIL import Image

from zeroconv.data.conditions import BadInput, get_extractor
from zeroconv.data.conditions.landmarks import COLORS, REGIONS, read_landmarks, region_of
from tests.data.conditions.photos import face_landmarks, photo, write_ldmks


def face_files(tmp_path, size=256):
    image_path = tmp_path / "000123.png"
    photo(size, size, seed=1).save(image_path)
    points = face_landmarks(size)
    write_ldmks(tmp_path / "000123_ldmks.txt", points)
    return image_path, points


def test_each_region_color_sits_at_its_annotated_points(tmp_path):
    image_path, points = face_files(tmp_path)
    mask = np.asarray(get_extractor("landmarks")(Image.open(image_path), path=image_path))
    for index, (x, y) in enumerate(np.round(points).astype(int)):
        assert tuple(mask[y, x]) == COLORS[region_of(index)], index
    assert len(set(COLORS.values())) == len(REGIONS) == 5
    assert tuple(mask[5, 5]) == (0, 0, 0)  # background


def test_points_are_scaled_to_a_resized_image(tmp_path):
    image_path, points = face_files(tmp_path, size=256)
    small = Image.open(image_path).resize((128, 128))
    mask = np.asarray(get_extractor("landmarks")(small, path=image_path))
    assert mask.shape == (128, 128, 3)
    for index, (x, y) in enumerate(np.round(points / 2).astype(int)):
        assert tuple(mask[y, x]) == COLORS[region_of(index)], index


def test_annotations_dir_and_pupil_lines_are_read(tmp_path):
    image_path, points = face_files(tmp_path)
    other = tmp_path / "ann"
    other.mkdir()
    write_ldmks(other / "000123_ldmks.txt", points + 3, pupils=False)
    assert np.allclose(read_landmarks(tmp_path / "000123_ldmks.txt"), points, atol=1e-3)
    moved = np.asarray(get_extractor("landmarks", annotations_dir=str(other))(Image.open(image_path), path=image_path))
    x, y = np.round(points[8] + 3).astype(int)
    assert tuple(moved[y, x]) == COLORS["jaw"]


def test_missing_or_malformed_annotations_are_bad_input(tmp_path):
    image_path, _ = face_files(tmp_path)
    extractor = get_extractor("landmarks")
    (tmp_path / "000123_ldmks.txt").write_text("1 2\n3 oops\n")
    with pytest.raises(BadInput, match="unreadable landmark annotation 000123_ldmks.txt"):
        extractor(Image.open(image_path), path=image_path)
    (tmp_path / "000123_ldmks.txt").write_text("1 2\n" * 10)
    with pytest.raises(BadInput, match="expected 68 lines"):
        extractor(Image.open(image_path), path=image_path)
    (tmp_path / "000123_ldmks.txt").unlink()
    with pytest.raises(BadInput, match="no landmark annotation"):
        extractor(Image.open(image_path), path=image_path)
    with pytest.raises(ValueError, match="needs the image's path"):
        extractor(Image.open(image_path))
