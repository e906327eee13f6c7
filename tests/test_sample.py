import contextlib
import json
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from zeroconv.errors import UserError
from zeroconv.sample import SCHEDULERS, main


@pytest.fixture(scope="module")
def controlnet_dir(tiny_base, tmp_path_factory):
    from zeroconv.models.base import load_base
    from zeroconv.models.controlnet import build_controlnet

    base = load_base(str(tiny_base))
    out = tmp_path_factory.mktemp("controlnet")
    build_controlnet(base.unet, base.vae_scale_factor).save_pretrained(out)
    (out / "config.yaml").write_text(f"pretrained_model_name_or_path: {tiny_base}\nresolution: 64\n")
    return out


@pytest.fixture()
def condition(tmp_path):
    path = tmp_path / "cond.png"
    Image.fromarray(np.zeros((80, 64, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sample_writes_pngs_with_each_scheduler(controlnet_dir, condition, tmp_path, scheduler):
    out = tmp_path / "out"
    assert main(["--controlnet", str(controlnet_dir), "--image", str(condition), "--prompt", "a red square",
                 "--steps", "2", "--scheduler", scheduler, "--num_images", "2", "--out", str(out)]) == 0
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == ["00000_0.png", "00000_1.png"]
    assert Image.open(images[0]).size == (64, 64)  # the training resolution recorded beside the ControlNet


def test_sample_jsonl_batch_and_guess_mode(controlnet_dir, condition, tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"condition": str(condition), "prompt": p}) for p in ("a", "b", "")))
    out = tmp_path / "out"
    assert main(["--controlnet", str(controlnet_dir), "--jsonl", str(jsonl), "--steps", "2", "--guess_mode",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a", "b", ""]


def test_sample_errors_name_the_flag(controlnet_dir, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        main(["--controlnet", str(controlnet_dir), "--image", str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match="--jsonl"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("{not json}\n")
        main(["--controlnet", str(controlnet_dir), "--jsonl", str(bad)])


@pytest.fixture(scope="module")
def toy_controlnet(tmp_path_factory):
    from zeroconv.models.base import load_base
    from zeroconv.models.controlnet import build_controlnet

    base = load_base("toy")
    out = tmp_path_factory.mktemp("toy_controlnet")
    build_controlnet(base.unet, base.vae_scale_factor).save_pretrained(out)
    return out


@contextlib.contextmanager
def diffusers_messages():
    """Every message diffusers logs (at warning level, whatever an earlier test set) or warns while inside."""
    from diffusers.utils import logging as diffusers_logging

    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # diffusers' loggers stop propagating there, before the root
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        diffusers_logging.set_verbosity(level)


CAST_WARNING = "Casting directly with `to()`"


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_sample_on_the_toy_base_loads_in_its_dtype_without_diffusers_cast_warnings(toy_controlnet, condition,
                                                                                   tmp_path, dtype):
    import torch

    from zeroconv.models.toy_base import build_vae

    with diffusers_messages() as messages:
        assert main(["--controlnet", str(toy_controlnet), "--pretrained_model_name_or_path", "toy", "--image",
                     str(condition), "--prompt", "red circle with navy background", "--steps", "2", "--resolution",
                     "64", "--dtype", dtype, "--out", str(tmp_path / "out")]) == 0
    assert not [m for m in messages if CAST_WARNING in m or "should be kept in float32" in m], messages
    assert Image.open(tmp_path / "out" / "00000_0.png").size == (64, 64)
    # the capture does see the warning: casting a model after building it is what used to print it
    with diffusers_messages() as messages:
        build_vae().to(torch.float32)
    assert any(CAST_WARNING in m for m in messages)


def test_base_is_loaded_in_the_sampling_dtype_from_a_folder_and_from_a_single_file(tiny_base, tmp_path):
    import torch

    from zeroconv.models.base import load_base
    from zeroconv.models.single_file import save_sd_single_file

    reference = load_base(str(tiny_base))
    single = save_sd_single_file(tmp_path / "base.safetensors", reference.unet, reference.vae,
                                 reference.text_encoder, reference.prediction_type)
    for source, tokenizer in ((str(tiny_base), None), (str(single), str(tiny_base))):  # a file has no tokenizer
        base = load_base(source, dtype=torch.bfloat16, tokenizer_name=tokenizer)
        for name in ("unet", "vae", "text_encoder"):
            expected = getattr(reference, name).state_dict()
            for key, value in getattr(base, name).state_dict().items():
                if expected[key].is_floating_point():  # the same weights, rounded once to bfloat16
                    assert value.dtype == torch.bfloat16 and torch.equal(value, expected[key].to(torch.bfloat16)), (
                        source, name, key)


@pytest.mark.parametrize("base_fixture, options", [("tiny_sdxl_base", {}), ("tiny_sd3_base", {"num_layers": 1}),
                                                   ("tiny_flux_base", {"num_double_layers": 1,
                                                                       "num_single_layers": 1})])
def test_sample_takes_the_family_of_the_base(base_fixture, options, request, condition, tmp_path):
    """An SDXL, SD3 or Flux ControlNet samples through its family's pipeline (SD3 and Flux with the T5 length it was
    trained with)."""
    from zeroconv.models.base import load_base

    base_dir = request.getfixturevalue(base_fixture)
    base = load_base(str(base_dir))
    folder = tmp_path / "controlnet"
    base.family.build_controlnet(base, **options).save_pretrained(folder)
    (folder / "config.yaml").write_text(f"pretrained_model_name_or_path: {base_dir}\nresolution: 64\n"
                                        "max_sequence_length: 16\n")
    out = tmp_path / "out"
    assert main(["--controlnet", str(folder), "--image", str(condition), "--prompt", "a red square", "--steps", "2",
                 "--guidance_scale", "3.5", "--out", str(out)]) == 0
    image = Image.open(out / "00000_0.png")
    assert image.size == (64, 64) and np.asarray(image).std() > 0


@pytest.fixture(scope="module")
def union_dir(tiny_sdxl_base, tmp_path_factory):
    import torch

    from zeroconv.models.base import load_base

    base = load_base(str(tiny_sdxl_base))
    controlnet = base.family.build_union_controlnet(base, 2)
    with torch.no_grad():  # a "trained" one, so the control mode changes the image
        for parameter in controlnet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    out = tmp_path_factory.mktemp("union")
    controlnet.save_pretrained(out)
    (out / "config.yaml").write_text(f"pretrained_model_name_or_path: {tiny_sdxl_base}\nresolution: 64\n"
                                     "conditioning_image_columns: mask,outline\n")
    return out


def test_a_union_controlnet_samples_the_control_mode_given_by_column_name_or_number(union_dir, condition, tmp_path):
    images = {}
    for mode in ("mask", "1", "outline"):
        out = tmp_path / mode
        assert main(["--controlnet", str(union_dir), "--image", str(condition), "--prompt", "a red square",
                     "--steps", "2", "--control_mode", mode, "--out", str(out)]) == 0
        record = json.loads((out / "samples.jsonl").read_text())
        images[mode] = (record["control_mode"], np.asarray(Image.open(out / record["image"])))
    assert [images[m][0] for m in ("mask", "1", "outline")] == [0, 1, 1]
    assert np.array_equal(images["1"][1], images["outline"][1])  # a name and its number are the same mode
    assert not np.array_equal(images["mask"][1], images["outline"][1])


def test_control_mode_is_required_for_a_union_controlnet_and_refused_for_a_plain_one(union_dir, controlnet_dir,
                                                                                     condition):
    with pytest.raises(UserError, match=r"--control_mode is required.*0 = mask, 1 = outline"):
        main(["--controlnet", str(union_dir), "--image", str(condition)])
    with pytest.raises(UserError, match=r"--control_mode depth: not a condition type.*0 to 1"):
        main(["--controlnet", str(union_dir), "--image", str(condition), "--control_mode", "depth"])
    with pytest.raises(UserError, match="plain one"):
        main(["--controlnet", str(controlnet_dir), "--image", str(condition), "--control_mode", "0"])
