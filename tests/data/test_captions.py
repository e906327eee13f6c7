import json

import pytest
from PIL import Image

from zeroconv.data.captions import (CaptionLookup, ModelCaptioner, check_template, fill_template, read_caption_file,
                                    sidecar_caption)
from zeroconv.data.prepare import PrepareConfig, prepare
from zeroconv.config import parse
from zeroconv.errors import UserError
from tests.data.conditions.photos import photo
from tests.data.conditions.tiny_models import WORDS, tiny_captioner


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    return tiny_captioner(tmp_path_factory.mktemp("blip"))


def test_sidecar_txt_wins_over_caption_and_is_stripped(tmp_path):
    image = tmp_path / "a.jpg"
    assert sidecar_caption(image) is None
    (tmp_path / "a.caption").write_text("from caption")
    assert sidecar_caption(image) == "from caption"
    (tmp_path / "a.txt").write_text("  from txt \n")
    assert sidecar_caption(image) == "from txt"


def test_mapping_files_csv_and_jsonl_with_bare_name_fallback(tmp_path):
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("image,caption\nsub/a.png,first\nb.png,second\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"file_name": "sub/a.png", "text": "first"}) + "\n\n" +
                     json.dumps({"file_name": "b.png", "prompt": "ignored", "text": "second"}) + "\n")
    for path in (csv_file, jsonl):
        mapping = read_caption_file(path)
        assert mapping == {"sub/a.png": "first", "b.png": "second"}
        lookup = CaptionLookup(mapping, sidecars=False)
        assert lookup(tmp_path / "sub/a.png", "sub/a.png") == ("first", "mapping")
        assert lookup(tmp_path / "other/a.png", "other/a.png") == ("first", "mapping")  # unique bare name
        assert lookup(tmp_path / "c.png", "c.png") == (None, None)


def test_mapping_file_mistakes_are_user_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        read_caption_file(bad)
    no_column = tmp_path / "c.csv"
    no_column.write_text("name,words\nx.png,hello\n")
    with pytest.raises(UserError, match="no file column"):
        read_caption_file(no_column)
    with pytest.raises(UserError, match="file not found"):
        read_caption_file(tmp_path / "missing.csv")


def test_template_fields_and_errors():
    assert fill_template("a photo of {folder}: {caption} ({stem}, {condition})", "a dog", "pets/dog1.jpg",
                         "canny") == "a photo of pets: a dog (dog1, canny)"
    assert fill_template(None, None, "x.png", "canny") == ""
    check_template("{caption}, high quality")
    with pytest.raises(UserError, match="unknown field"):
        check_template("{subject}")
    with pytest.raises(UserError, match="caption_template"):
        check_template("{caption")


def test_model_captioner_batches_greedily_and_deterministically(captioner_dir):
    captioner = ModelCaptioner(str(captioner_dir), max_new_tokens=6, device="cpu")
    images = [photo(40, 40, seed=i) for i in range(3)]
    captions = captioner(images)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert set(" ".join(captions).split()) <= set(WORDS)
    assert captioner(images) == captions
    assert [captioner([im])[0] for im in images] == captions
    prompted = ModelCaptioner(str(captioner_dir), prompt="a photo of", max_new_tokens=4, device="cpu")
    assert all(c.startswith("a photo of") for c in prompted(images[:2]))


def test_prepare_captions_with_the_model_only_what_has_no_sidecar(tmp_path, captioner_dir):
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(5):
        photo(40, 40, seed=i).save(images / f"{i}.png")
    (images / "2.txt").write_text("hand written")
    cfg = parse(PrepareConfig, ["--images", str(images), "--out", str(tmp_path / "out"), "--condition", "grayscale",
                                "--resolution", "32", "--caption_model", str(captioner_dir), "--caption_batch_size",
                                "2", "--caption_max_new_tokens", "5", "--num_proc", "1", "--device", "cpu"],
                prog="zeroconv prepare")
    report = prepare(cfg)
    assert report["counts"]["captions_by_source"] == {"model": 4, "sidecar": 1}
    rows = [json.loads(line) for line in (tmp_path / "out/metadata.jsonl").read_text().splitlines()]
    texts = {row["file_name"]: row["text"] for row in rows}
    assert texts["images/2.png"] == "hand written"
    direct = ModelCaptioner(str(captioner_dir), max_new_tokens=5, device="cpu")
    expected = direct([Image.open(tmp_path / "out/images/0.png").convert("RGB")])[0]
    assert texts["images/0.png"] == expected and expected
    again = prepare(cfg)  # resumed: nothing recaptioned, same dataset
    assert again["counts"]["captioned_by_model_this_run"] == 0
    assert [json.loads(line) for line in (tmp_path / "out/metadata.jsonl").read_text().splitlines()] == rows
