import json

import numpy as np
import pytest
from PIL import Image

from zeroconv.data import synth
from zeroconv.errors import UserError


def test_color_names_are_spelled_in_words_as_fill50k():
    assert synth.color_words("burlywood") == "burly wood"
    assert synth.color_words("lightgoldenrodyellow") == "light golden rod yellow"
    assert synth.CSS_COLORS["burly wood"] == (222, 184, 135)
    assert all(name in synth.CSS_COLORS for name in synth.DISTINCT_COLORS)


def test_distinct_palette_is_well_separated():
    rgb = np.array([synth.CSS_COLORS[n] for n in synth.DISTINCT_COLORS], float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(len(rgb), 1)]
    assert distances.min() >= synth.MIN_CONTRAST


def test_fill_example_outline_matches_filled_circle():
    example = synth.fill_example(seed=3, index=7, resolution=64, palette="distinct")
    circle, background = synth.parse_fill_prompt(example.prompt)
    assert example.prompt == f"{circle} circle with {background} background"
    outline = example.source.max(axis=2) > 0
    # every outline pixel lies on the target's circle boundary: circle color inside or next to it
    is_circle = np.all(example.target == synth.CSS_COLORS[circle], axis=2)
    assert outline.any() and is_circle.any()
    ys, xs = np.nonzero(outline)
    cy, cx = np.nonzero(is_circle)
    assert abs(ys.mean() - cy.mean()) < 1.5 and abs(xs.mean() - cx.mean()) < 1.5
    assert np.all(example.target[0, 0] == synth.CSS_COLORS[background])


def test_write_fill_layout_is_fill50k_and_deterministic(tmp_path):
    one = synth.write_fill(tmp_path / "a", n=6, resolution=32, seed=5, workers=2, progress=False)
    two = synth.write_fill(tmp_path / "b", n=6, resolution=32, seed=5, workers=1, progress=False)
    rows = [json.loads(line) for line in (one / "prompt.json").read_text().splitlines()]
    assert rows[0] == {"source": "source/0.png", "target": "target/0.png", "prompt": rows[0]["prompt"]}
    assert [r["source"] for r in rows] == [f"source/{i}.png" for i in range(6)]
    assert (one / "prompt.json").read_text() == (two / "prompt.json").read_text()
    for i in range(6):
        for kind in ("source", "target"):
            a = np.asarray(Image.open(one / kind / f"{i}.png"))
            assert a.shape == (32, 32, 3)
            assert np.array_equal(a, np.asarray(Image.open(two / kind / f"{i}.png")))
    other = synth.write_fill(tmp_path / "c", n=6, resolution=32, seed=6, workers=1, progress=False)
    assert (other / "prompt.json").read_text() != (one / "prompt.json").read_text()


def test_written_fill_set_reads_through_the_fill50k_source(tmp_path):
    from zeroconv.config import TrainConfig
    from zeroconv.data.sources import load_examples

    out = synth.write_fill(tmp_path / "fill", n=4, resolution=32, seed=0, workers=1, progress=False)
    examples = load_examples(TrainConfig(train_data_dir=str(out)))
    assert len(examples) == 4
    first = examples[0]
    assert first.caption.endswith(" background")
    assert first.open_image().size == (32, 32)
    assert np.asarray(first.open_conditioning_image().convert("L")).max() == 255


def test_shapes_captions_name_color_and_shape():
    image, caption = synth.shapes_example(seed=0, index=1, resolution=64)
    words = caption.split(" with ")
    shape = words[0].rsplit(" ", 1)[1]
    color = words[0].rsplit(" ", 1)[0]
    background = words[1].removesuffix(" background")
    assert shape in synth.SHAPES and color in synth.DISTINCT_COLORS and background in synth.DISTINCT_COLORS
    assert np.all(image[0, 0] == synth.CSS_COLORS[background])
    assert (np.all(image == synth.CSS_COLORS[color], axis=2)).sum() > 20


def test_cli_writes_dataset_and_refuses_to_overwrite(tmp_path, capsys):
    assert synth.main(["fill", str(tmp_path / "f"), "--n", "3", "--resolution", "32", "--workers", "1"]) == 0
    assert "wrote 3 fill examples" in capsys.readouterr().out
    with pytest.raises(UserError, match="--overwrite"):
        synth.main(["fill", str(tmp_path / "f"), "--n", "3", "--resolution", "32", "--workers", "1"])
    with pytest.raises(UserError, match="--n 0"):
        synth.main(["shapes", str(tmp_path / "s"), "--n", "0"])


def test_parse_fill_prompt_rejects_other_prompts():
    assert synth.parse_fill_prompt("burly wood circle with orange background") == ("burly wood", "orange")
    with pytest.raises(ValueError):
        synth.parse_fill_prompt("a photo of a cat")
    with pytest.raises(ValueError, match="not a CSS color"):
        synth.parse_fill_prompt("plaid circle with red background")
