import json
import logging

import numpy as np
import pytest
from PIL import Image

from zeroconv.config import TrainConfig
from zeroconv.data.sources import check_data_args, load_examples
from zeroconv.errors import UserError
from zeroconv.testing import make_image_dataset


def triples(examples):
    return [(np.asarray(e.open_image()).tobytes(), np.asarray(e.open_conditioning_image()).tobytes(), e.caption)
            for e in examples]


def save_custom_columns(src_root, out_dir, as_dict=True):
    """The imagefolder rows as a save_to_disk dataset with non-default column names."""
    import datasets

    rows = [json.loads(line) for line in (src_root / "metadata.jsonl").read_text().splitlines()]
    data = {"photo": [Image.open(src_root / r["file_name"]) for r in rows],
            "edges": [Image.open(src_root / r["conditioning_image_file_name"]) for r in rows],
            "prompt": [r["text"] for r in rows]}
    features = datasets.Features({"photo": datasets.Image(), "edges": datasets.Image(), "prompt": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(data, features=features)
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(out_dir))
    return out_dir


def test_every_source_gives_the_same_triples(tmp_path):
    reference = None
    for layout in ("imagefolder", "fill50k", "kohya"):
        root = make_image_dataset(tmp_path / layout, n=5, size=32, layout=layout, seed=3)
        got = triples(load_examples(TrainConfig(train_data_dir=str(root), resolution=32)))
        assert len(got) == 5
        reference = reference or got
        assert got == reference, layout
    saved = save_custom_columns(tmp_path / "imagefolder", tmp_path / "saved")
    cfg = TrainConfig(dataset_name=str(saved), image_column="photo", conditioning_image_column="edges",
                      caption_column="prompt")
    check_data_args(cfg)
    examples = load_examples(cfg)
    assert triples(examples) == reference
    assert examples[2].name == "row 2"
    # a local folder in the imagefolder layout given as --dataset_name is read the same
    assert triples(load_examples(TrainConfig(dataset_name=str(tmp_path / "imagefolder")))) == reference


def test_saved_plain_dataset_and_max_train_samples(tmp_path):
    root = make_image_dataset(tmp_path / "src", n=6, size=32)
    saved = save_custom_columns(root, tmp_path / "saved", as_dict=False)
    cfg = TrainConfig(dataset_name=str(saved), image_column="photo", conditioning_image_column="edges",
                      caption_column="prompt", max_train_samples=4)
    examples = load_examples(cfg)
    assert len(examples) == 4
    with pytest.raises(IndexError):
        examples[4]


def test_imagefolder_custom_columns_and_caption_lists(tmp_path):
    make_image_dataset(tmp_path, n=3, size=32)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    with open(tmp_path / "metadata.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({"target_file_name": r["file_name"], "hint_file_name": r["conditioning_image_file_name"],
                                 "captions": [r["text"], "another"]}) + "\n")
    cfg = TrainConfig(train_data_dir=str(tmp_path), image_column="target", conditioning_image_column="hint",
                      caption_column="captions")
    examples = load_examples(cfg)
    assert examples[1].caption == [rows[1]["text"], "another"]
    assert examples[1].image.endswith(rows[1]["file_name"])
    assert examples[1].conditioning_image.endswith(rows[1]["conditioning_image_file_name"])
    with pytest.raises(UserError, match=r"--image_column image: .*columns are: target, hint, captions"):
        check_data_args(TrainConfig(train_data_dir=str(tmp_path), conditioning_image_column="hint",
                                    caption_column="captions"))


def test_condition_flag_allows_no_conditioning_column(tmp_path):
    make_image_dataset(tmp_path, n=3, size=32)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": r["file_name"], "text": r["text"]}) + "\n" for r in rows))
    with pytest.raises(UserError, match="--conditioning_image_column conditioning_image.*--condition"):
        check_data_args(TrainConfig(train_data_dir=str(tmp_path)))
    examples = load_examples(TrainConfig(train_data_dir=str(tmp_path), condition="canny"))
    assert len(examples) == 3 and examples[0].conditioning_image is None
    assert examples[0].open_conditioning_image() is None


def test_kohya_missing_captions_warn_once_with_count(tmp_path, caplog):
    root = make_image_dataset(tmp_path, n=4, size=32, layout="kohya")
    (root / "images" / "0001.txt").unlink()
    (root / "images" / "0002.txt").rename(root / "images" / "0002.caption")
    (root / "images" / "0003.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="zeroconv.data"):
        examples = load_examples(TrainConfig(train_data_dir=str(root)))
    assert [e.caption for e in examples] == ["a red square", "", "a blue square", ""]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4" in warnings[0]


def test_kohya_matches_by_stem_across_extensions(tmp_path):
    root = make_image_dataset(tmp_path, n=3, size=32, layout="kohya")
    cond = root / "conditioning" / "0001.png"
    Image.open(cond).save(root / "conditioning" / "0001.jpg")
    cond.unlink()
    examples = load_examples(TrainConfig(train_data_dir=str(root)))
    assert examples[1].conditioning_image.endswith("0001.jpg")
    (root / "conditioning" / "0002.png").unlink()
    with pytest.raises(UserError, match=r"0002\.png has no conditioning image"):
        check_data_args(TrainConfig(train_data_dir=str(root)))


def test_fingerprint_is_stable_and_follows_content(tmp_path):
    root = make_image_dataset(tmp_path, n=4, size=32)
    cfg = TrainConfig(train_data_dir=str(root))
    first = load_examples(cfg).fingerprint()
    assert load_examples(cfg).fingerprint() == first
    assert load_examples(TrainConfig(train_data_dir=str(root), max_train_samples=3)).fingerprint() != first
    Image.new("RGB", (32, 32), "white").save(root / "0002.png")
    assert load_examples(cfg).fingerprint() != first


def test_saved_dataset_fingerprint_follows_columns_and_count(tmp_path):
    root = make_image_dataset(tmp_path / "src", n=4, size=32)
    saved = save_custom_columns(root, tmp_path / "saved")
    cfg = dict(dataset_name=str(saved), image_column="photo", conditioning_image_column="edges",
               caption_column="prompt")
    first = load_examples(TrainConfig(**cfg)).fingerprint()
    assert load_examples(TrainConfig(**cfg)).fingerprint() == first
    assert load_examples(TrainConfig(**cfg, max_train_samples=2)).fingerprint() != first
    assert load_examples(TrainConfig(**dict(cfg, conditioning_image_column="photo"))).fingerprint() != first


def data_cfg(root, **overrides):
    return TrainConfig(**{"train_data_dir": str(root), **overrides})


@pytest.mark.parametrize("overrides, pattern", [
    ({"train_data_dir": None}, "none of them given; give exactly one of --dataset_name, --train_data_dir and "
                               "--jsonl_for_train"),
    ({"dataset_name": "user/data"}, "--dataset_name and --train_data_dir given; give exactly one"),
    ({"jsonl_for_train": "rows.jsonl"}, "--train_data_dir and --jsonl_for_train given; give exactly one"),
    ({"train_data_dir": None, "jsonl_for_train": "/no/rows.jsonl"}, r"--jsonl_for_train /no/rows\.jsonl: no such file"),
    ({"train_data_dir": "/no/such/folder"}, r"--train_data_dir /no/such/folder: no such folder"),
    ({"train_data_dir": None, "dataset_name": "./no/such"}, r"--dataset_name \./no/such: no such folder"),
    ({"caption_column": "prompt"}, r"--caption_column prompt: no such column .*columns are: image, "
                                   r"conditioning_image, text"),
    ({"resolution": 100}, r"--resolution 100: must be a positive multiple of 8"),
    ({"proportion_empty_prompts": 1.5}, r"--proportion_empty_prompts 1.5: must be between 0 and 1"),
    ({"max_train_samples": 0}, r"--max_train_samples 0"),
    ({"validation_prompt": ["a", "b"], "validation_image": ["x.png", "y.png", "z.png"]},
     r"2 --validation_prompt and 3 --validation_image do not pair"),
    ({"validation_prompt": ["a"]}, r"--validation_prompt is set but --validation_image is not"),
    ({"validation_prompt": ["a"], "validation_image": ["/no/such.png"]}, r"--validation_image /no/such.png: no such"),
])
def test_check_data_args_errors(tmp_path, overrides, pattern):
    root = make_image_dataset(tmp_path, n=2, size=16)
    with pytest.raises(UserError, match=pattern):
        check_data_args(data_cfg(root, **overrides))


def test_check_data_args_missing_file_and_empty(tmp_path):
    root = make_image_dataset(tmp_path, n=3, size=16)
    check_data_args(data_cfg(root))
    (root / "conditioning" / "0001.png").unlink()
    with pytest.raises(UserError, match=r"metadata\.jsonl line 2: conditioning_image_file_name "
                                        r"conditioning/0001\.png not found"):
        check_data_args(data_cfg(root))
    (root / "metadata.jsonl").write_text("")
    with pytest.raises(UserError, match=r"--train_data_dir .*: no examples found"):
        check_data_args(data_cfg(root))


def test_fill50k_missing_target_named(tmp_path):
    root = make_image_dataset(tmp_path, n=3, size=16, layout="fill50k")
    assert len(load_examples(data_cfg(root))) == 3
    (root / "target" / "0002.png").unlink()
    with pytest.raises(UserError, match=r"prompt\.json line 3: target target/0002\.png not found"):
        check_data_args(data_cfg(root))


def test_uncached_hub_id_offline_is_a_user_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"--dataset_name zeroconv-test/not-cached: not in the local cache and "
                                        r"HF_HUB_OFFLINE"):
        check_data_args(TrainConfig(dataset_name="zeroconv-test/not-cached", cache_dir=str(tmp_path)))


def test_jsonl_for_train_reads_rows_as_the_sd3_and_flux_scripts_do(tmp_path, monkeypatch):
    """One JSON object per line, image values file paths; relative ones from the working directory (as the
    scripts' Image.open); the columns by --image_column etc.; a broken file is one UserError naming it."""
    import json

    root = make_image_dataset(tmp_path / "data", n=3, size=16)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"photo": f"data/{row['file_name']}",
                                         "edges": f"data/{row['conditioning_image_file_name']}",
                                         "prompt": row["text"]}) + "\n" for row in rows))
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(jsonl_for_train=str(jsonl), image_column="photo", conditioning_image_column="edges",
                      caption_column="prompt")
    examples = check_data_args(cfg)
    assert len(examples) == 3 and examples[1].caption == rows[1]["text"]
    assert examples[1].open_image().size == (16, 16) and examples[1].open_conditioning_image().size == (16, 16)
    from PIL import Image

    assert list(examples[2].open_image().getdata()) == list(Image.open(root / rows[2]["file_name"]).getdata())
    jsonl.write_text("{not json\n")
    with pytest.raises(UserError, match=r"--jsonl_for_train .*rows\.jsonl: not a JSON-lines file of rows"):
        check_data_args(cfg)
