"""Training a union ControlNet (issue 15, deliverable 6) on the tiny SDXL base from a dataset with two condition
columns: the per-sample draw of the condition types, the run, its save in diffusers' layout, exact resume,
sampling with diffusers' union pipeline, and the errors."""

import numpy as np
import pytest
import torch

from tests.train.helpers import controlnet_weights, losses, run_training, tiny_config
from zeroconv.errors import UserError

COLUMNS = "mask,outline"


@pytest.fixture(scope="module")
def union_dataset(tmp_path_factory):
    from zeroconv.testing import make_union_dataset

    return make_union_dataset(tmp_path_factory.mktemp("union_data"), n=8, size=64)


def union_dataset_of(cfg):
    from zeroconv.data.sources import load_examples
    from zeroconv.train.setup import build_dataset

    return build_dataset(cfg, load_examples(cfg), cfg.seed)


def test_each_sample_draws_its_types_with_the_documented_probabilities(tiny_sdxl_base, union_dataset, tmp_path):
    cfg = tiny_config(tiny_sdxl_base, union_dataset, tmp_path, conditioning_image_columns=COLUMNS,
                      union_condition_weights="3,1", union_extra_condition_probability=0.2)
    dataset = union_dataset_of(cfg)
    draws = np.stack([dataset.union_draw(i) for i in range(4000)])
    # type k is given with probability w_k + (1 - w_k) p: 0.75 + 0.25 * 0.2 and 0.25 + 0.75 * 0.2
    np.testing.assert_allclose(draws.mean(axis=0), [0.80, 0.40], atol=0.03)
    assert draws.any(axis=1).all()  # every sample is given at least one type
    again = np.stack([union_dataset_of(cfg).union_draw(i) for i in range(200)])
    assert np.array_equal(again, draws[:200])  # from the seed alone
    other = union_dataset_of(tiny_config(tiny_sdxl_base, union_dataset, tmp_path, seed=8,
                                         conditioning_image_columns=COLUMNS, union_condition_weights="3,1",
                                         union_extra_condition_probability=0.2))
    assert not np.array_equal(np.stack([other.union_draw(i) for i in range(200)]), draws[:200])
    dataset.set_epoch(1)
    assert not np.array_equal(np.stack([dataset.union_draw(i) for i in range(200)]), draws[:200])
    # p = 0: exactly one type per sample, as sampling with one control_mode
    single = union_dataset_of(tiny_config(tiny_sdxl_base, union_dataset, tmp_path, conditioning_image_columns=COLUMNS))
    counts = np.stack([single.union_draw(i) for i in range(2000)])
    assert (counts.sum(axis=1) == 1).all()
    np.testing.assert_allclose(counts.mean(axis=0), [0.5, 0.5], atol=0.04)


def test_an_item_holds_the_given_conditions_and_zeros_elsewhere(tiny_sdxl_base, union_dataset, tmp_path):
    from PIL import Image

    from zeroconv.data.transforms import to_tensor

    cfg = tiny_config(tiny_sdxl_base, union_dataset, tmp_path, conditioning_image_columns=COLUMNS,
                      union_extra_condition_probability=0.5)
    dataset = union_dataset_of(cfg)
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        given = item["control_types"]
        assert item["conditioning_pixel_values"].shape == (2, 3, 64, 64) and given.dtype == torch.bool
        for k, column in enumerate(COLUMNS.split(",")):
            expected = to_tensor(Image.open(union_dataset / column / f"{index:04d}.png").convert("RGB"))
            assert torch.equal(item["conditioning_pixel_values"][k], expected if given[k] else torch.zeros_like(expected))
        seen.add(tuple(given.tolist()))
    assert len(seen) > 1


def test_union_run_trains_saves_in_diffusers_layout_and_resumes_bit_identically(tiny_sdxl_base, union_dataset,
                                                                                  tmp_path):
    from diffusers import ControlNetUnionModel

    common = dict(train_batch_size=4, conditioning_image_columns=COLUMNS, union_extra_condition_probability=0.5,
                  random_flip=True, checkpointing_steps=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_training(tiny_config(tiny_sdxl_base, union_dataset, straight, max_train_steps=4, **common)) == 0
    assert run_training(tiny_config(tiny_sdxl_base, union_dataset, resumed, max_train_steps=2, **common)) == 0
    assert run_training(tiny_config(tiny_sdxl_base, union_dataset, resumed, max_train_steps=4,
                                    resume_from_checkpoint="latest", **common)) == 0
    a, b = controlnet_weights(straight), controlnet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    model = ControlNetUnionModel.from_pretrained(straight)
    assert model.config.num_control_type == 2
    assert "task_embedding" in a and a["controlnet_mid_block.weight"].abs().sum() > 0  # the zero convs learned
    assert all(torch.equal(model.state_dict()[k], a[k]) for k in a)


def test_the_union_pipeline_samples_each_control_mode(tiny_sdxl_base, union_dataset, tmp_path):
    from zeroconv.data.transforms import load_condition
    from zeroconv.models.base import load_base

    base = load_base(str(tiny_sdxl_base))
    controlnet = base.family.build_union_controlnet(base, 2)
    with torch.no_grad():  # a "trained" one, so the mode changes the image
        for parameter in controlnet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter, generator=None))
    controlnet.save_pretrained(tmp_path / "union")
    controlnet = base.family.load_controlnet(str(tmp_path / "union"))
    pipe = base.family.pipeline(base, controlnet)
    assert type(pipe).__mro__[1].__name__ == "StableDiffusionXLControlNetUnionPipeline"
    condition = load_condition(union_dataset / "mask" / "0000.png", 64, 3)
    images = [np.asarray(pipe("a red square", image=condition, control_mode=mode, num_inference_steps=2,
                              generator=torch.Generator().manual_seed(0), height=64, width=64).images[0])
              for mode in (0, 1)]
    assert images[0].shape == (64, 64, 3) and not np.array_equal(images[0], images[1])


def test_a_missing_condition_column_names_it_and_the_columns_there_are(tiny_sdxl_base, union_dataset, tmp_path):
    cfg = tiny_config(tiny_sdxl_base, union_dataset, tmp_path, conditioning_image_columns="mask,depth")
    with pytest.raises(UserError, match=r"no column 'depth' .*columns are: image, text, mask, outline"):
        union_dataset_of(cfg)


def test_union_on_a_family_without_one_is_refused_naming_sdxl(tiny_base, union_dataset, tmp_path):
    cfg = tiny_config(tiny_base, union_dataset, tmp_path, conditioning_image_columns=COLUMNS)
    with pytest.raises(UserError, match=r"--conditioning_image_columns: a union ControlNet cannot be trained on "
                                        r"Stable Diffusion 1\.x/2\.x.*use an SDXL base"):
        run_training(cfg)


@pytest.mark.parametrize("overrides, message", [
    (dict(conditioning_image_columns="mask"), "one condition type is a plain one"),
    (dict(conditioning_image_columns="mask,mask"), "every column once"),
    (dict(conditioning_image_columns=COLUMNS, union_condition_weights="1"), "give 2 numbers"),
    (dict(conditioning_image_columns=COLUMNS, union_extra_condition_probability=1.5), "between 0 and 1"),
    (dict(conditioning_image_columns=COLUMNS, cache="on"), "--cache on"),
    (dict(union_condition_weights="1,1"), "is for a union ControlNet"),
])
def test_union_flags_are_checked_before_any_model_loads(tiny_sdxl_base, union_dataset, tmp_path, overrides, message):
    from zeroconv.config import check_train_config

    with pytest.raises(UserError, match=message):
        check_train_config(tiny_config(tiny_sdxl_base, union_dataset, tmp_path, **overrides))


def test_flux_union_trains_with_num_mode_and_its_pipeline_takes_control_mode(tiny_flux_base, union_dataset, tmp_path):
    from diffusers import FluxControlNetModel

    from zeroconv.data.transforms import load_condition
    from zeroconv.models.base import load_base

    flux = dict(conditioning_image_columns=COLUMNS, num_double_layers=1, num_single_layers=1, max_sequence_length=32,
                train_batch_size=4, max_train_steps=2, mixed_precision="no")
    assert run_training(tiny_config(tiny_flux_base, union_dataset, tmp_path / "run", **flux)) == 0
    model = FluxControlNetModel.from_pretrained(tmp_path / "run")
    assert model.config.num_mode == 2
    weights = controlnet_weights(tmp_path / "run")
    fresh = load_base(str(tiny_flux_base)).family.build_union_controlnet(load_base(str(tiny_flux_base)), 2,
                                                                         num_double_layers=1, num_single_layers=1)
    # the mode embedding is read and learned (the one each sample was given)
    assert not torch.equal(weights["controlnet_mode_embedder.weight"], fresh.state_dict()["controlnet_mode_embedder.weight"])
    base = load_base(str(tiny_flux_base))
    base.max_sequence_length = 32
    pipe = base.family.pipeline(base, model)
    condition = load_condition(union_dataset / "mask" / "0000.png", 64, 3)
    image = pipe("a red square", image=condition, control_mode=1, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_flux_union_refuses_several_types_per_sample(tiny_flux_base, union_dataset, tmp_path):
    cfg = tiny_config(tiny_flux_base, union_dataset, tmp_path, conditioning_image_columns=COLUMNS,
                      union_extra_condition_probability=0.3, num_double_layers=1, num_single_layers=1)
    with pytest.raises(UserError, match="--union_extra_condition_probability: a Flux ControlNet-Union reads one"):
        run_training(cfg)


def test_validation_samples_each_condition_with_its_mode_and_reports_it_separately(tiny_sdxl_base, tmp_path,
                                                                                   monkeypatch):
    import json

    from zeroconv.testing import make_union_dataset
    from zeroconv.train import validate

    # columns named after metrics: each type is scored with its own (grayscale similarity, canny F1)
    data = make_union_dataset(tmp_path / "data", n=4, columns=("grayscale", "canny"))
    modes = []
    generate = validate.generate

    def recording(*args, **kwargs):
        modes.append(args[-1] if len(args) > 7 else kwargs.get("control_modes"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(validate, "generate", recording)
    out = tmp_path / "run"
    cfg = tiny_config(tiny_sdxl_base, data, out, conditioning_image_columns="grayscale,canny", max_train_steps=1,
                      validation_prompt=["a red square"],
                      validation_image=[str(data / "canny" / "0000.png"), str(data / "grayscale" / "0001.png")],
                      validation_condition=["canny", "grayscale"], num_validation_images=1, validation_inference_steps=2)
    assert run_training(cfg) == 0
    assert modes == [[1, 0], [1, 0]]  # the baseline and the final validation, each pair with its type's mode
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {key for row in rows for key in row if key.startswith("validation/")}
    assert any(k.startswith("validation/grayscale/") for k in keys) and any(k.startswith("validation/canny/") for k in keys)
    summary = json.loads((out / "train_summary.json").read_text())
    assert any(key.startswith("canny/") for key in json.dumps(summary).split('"'))
