import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from zeroconv.config import TrainConfig
from zeroconv.data.dataset import ControlNetDataset, collate
from zeroconv.data.sources import Example, load_examples
from zeroconv.data.transforms import PairedTransform
from zeroconv.errors import UserError
from zeroconv.testing import make_image_dataset


@pytest.fixture
def examples(tmp_path):
    root = make_image_dataset(tmp_path / "data", n=24, size=32, seed=1)
    return load_examples(TrainConfig(train_data_dir=str(root)))


def flips(dataset):
    unflipped = ControlNetDataset(dataset.examples, dataset.transform, seed=dataset.seed)
    return [not torch.equal(dataset[i]["pixel_values"], unflipped[i]["pixel_values"]) for i in range(len(dataset))]


def test_items_and_collate(examples):
    ds = ControlNetDataset(examples, PairedTransform(16, 1))
    item = ds[3]
    assert item["pixel_values"].shape == (3, 16, 16) and item["conditioning_pixel_values"].shape == (1, 16, 16)
    assert item["caption"] == examples[3].caption and item["index"] == 3 and item["skipped"] == 0
    batch = collate([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["conditioning_pixel_values"].shape == (4, 1, 16, 16)
    assert batch["caption"] == [examples[i].caption for i in range(4)]
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["skipped"] == 0


def test_flip_is_applied_to_image_and_condition_together(examples):
    plain = ControlNetDataset(examples, PairedTransform(16))
    flipping = ControlNetDataset(examples, PairedTransform(16), random_flip=True)
    pattern = flips(flipping)
    assert 0 < sum(pattern) < len(pattern)
    for i, flipped in enumerate(pattern):
        a, b = plain[i], flipping[i]
        expected = (lambda t: t.flip(-1)) if flipped else (lambda t: t)
        assert torch.equal(b["pixel_values"], expected(a["pixel_values"]))
        assert torch.equal(b["conditioning_pixel_values"], expected(a["conditioning_pixel_values"]))


def test_draws_depend_on_seed_epoch_and_index_only(examples):
    a = ControlNetDataset(examples, PairedTransform(16), seed=7, random_flip=True)
    b = ControlNetDataset(examples, PairedTransform(16), seed=7, random_flip=True)
    epoch0 = flips(a)
    b[5], b[2]  # access order does not matter
    assert flips(b) == epoch0
    a.set_epoch(1)
    epoch1 = flips(a)
    assert epoch1 != epoch0
    b.set_epoch(1)
    assert flips(b) == epoch1
    a.set_epoch(0)
    assert flips(a) == epoch0
    assert flips(ControlNetDataset(examples, PairedTransform(16), seed=8, random_flip=True)) != epoch0


def test_worker_count_does_not_change_batches(examples):
    ds = ControlNetDataset(examples, PairedTransform(16), seed=3, random_flip=True)
    ds.set_epoch(2)
    batches = [list(DataLoader(ds, batch_size=4, num_workers=w, collate_fn=collate)) for w in (0, 2)]
    for one, other in zip(*batches):
        assert torch.equal(one["pixel_values"], other["pixel_values"])
        assert torch.equal(one["conditioning_pixel_values"], other["conditioning_pixel_values"])


def test_caption_lists_pick_one_per_epoch_deterministically():
    image = Image.new("RGB", (16, 16))
    captions = [f"caption {k}" for k in range(5)]
    rows = [Example(image, image, captions, f"row {i}") for i in range(20)]
    ds = ControlNetDataset(rows, PairedTransform(16), seed=0)
    first = [ds[i]["caption"] for i in range(20)]
    assert set(first) <= set(captions) and len(set(first)) > 1
    assert [ds[i]["caption"] for i in range(20)] == first
    ds.set_epoch(1)
    assert [ds[i]["caption"] for i in range(20)] != first
    assert ControlNetDataset([Example(image, image, [], "empty")], PairedTransform(16))[0]["caption"] == ""


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "garbage", "deleted"])
def test_bad_sample_is_replaced_counted_and_logged(examples, caplog, damage):
    bad = examples[5].image
    content = open(bad, "rb").read()
    if damage == "deleted":
        import os

        os.remove(bad)
    else:
        with open(bad, "wb") as fh:
            fh.write({"zero_bytes": b"", "truncated": content[: len(content) // 2],
                      "garbage": b"not an image at all" * 10}[damage])
    ds = ControlNetDataset(examples, PairedTransform(16))
    with caplog.at_level(logging.WARNING, logger="zeroconv.data"):
        item = ds[5]
        ds[5]
    assert item["index"] == 6 and item["skipped"] == 1
    assert torch.equal(item["pixel_values"], ds[6]["pixel_values"])
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and bad in messages[0]  # logged once, naming the file
    batch = collate([ds[i] for i in range(4, 8)])
    assert batch["skipped"] == 1 and batch["pixel_values"].shape[0] == 4
    with pytest.raises(UserError, match=f"{bad}.*--strict_data"):
        ControlNetDataset(examples, PairedTransform(16), strict_data=True)[5]


def test_bad_conditioning_image_is_named_and_last_index_wraps(examples):
    last = len(examples) - 1
    cond = examples[last].conditioning_image
    open(cond, "wb").close()
    item = ControlNetDataset(examples, PairedTransform(16))[last]
    assert item["index"] == 0 and item["skipped"] == 1
    with pytest.raises(UserError, match=cond):
        ControlNetDataset(examples, PairedTransform(16), strict_data=True)[last]


def test_all_samples_unreadable_is_an_error(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    rows = [Example(str(path), str(path), "x", str(path))] * 3
    with pytest.raises(UserError, match="none of the 3 training samples could be read"):
        ControlNetDataset(rows, PairedTransform(16))[0]


def test_condition_fn_sees_the_fitted_image(tmp_path):
    root = make_image_dataset(tmp_path, n=2, size=40)
    examples = load_examples(TrainConfig(train_data_dir=str(root), condition="canny"))
    seen = []

    def invert(image, rng=None, path=None):
        seen.append((image.mode, image.size))
        return Image.fromarray(255 - np.asarray(image))

    ds = ControlNetDataset(examples, PairedTransform(16, 3), random_flip=True, condition_fn=invert)
    for i in range(2):
        item = ds[i]
        assert torch.allclose(item["conditioning_pixel_values"], 1 - (item["pixel_values"] + 1) / 2, atol=1e-6)
    assert seen == [("RGB", (16, 16))] * 2
    with pytest.raises(UserError, match="--condition"):
        ControlNetDataset(examples, PairedTransform(16))


def test_saved_dataset_rows_decode_in_the_dataset(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(3)]
    features = datasets.Features({"img": datasets.Image(), "cond": datasets.Image(), "txt": datasets.Value("string")})
    datasets.Dataset.from_dict({"img": images, "cond": images, "txt": ["a", "b", "c"]}, features=features) \
        .save_to_disk(str(tmp_path / "saved"))
    examples = load_examples(TrainConfig(dataset_name=str(tmp_path / "saved"), image_column="img",
                                         conditioning_image_column="cond", caption_column="txt"))
    ds = ControlNetDataset(examples, PairedTransform(24))
    item = ds[1]
    assert item["caption"] == "b"
    expected = torch.from_numpy(np.asarray(images[1], dtype=np.float32)).permute(2, 0, 1) / 255
    assert torch.allclose(item["conditioning_pixel_values"], expected, atol=1e-6)


def test_condition_randomness_is_per_sample_and_epoch(tmp_path):
    root = make_image_dataset(tmp_path, n=3, size=32)
    examples = load_examples(TrainConfig(train_data_dir=str(root), condition="canny"))
    draws = {}

    def record(image, rng=None, path=None):
        draws.setdefault(path, []).append(float(rng.random()))
        return image

    ds = ControlNetDataset(examples, PairedTransform(16, 3), seed=5, condition_fn=record)
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        for i in (2, 0, 1):
            ds[i]
    for values in draws.values():
        assert values[0] == values[2] and values[0] != values[1]  # same (epoch, sample), same draw
    assert len({v[0] for v in draws.values()}) == 3  # and each sample its own
