"""The differentiable extractors of the consistency reward beyond edges and grayscale: blur, inpaint, depth and
segmentation, each against the condition its numpy extractor (or pipeline) makes of the same image."""

import numpy as np
import pytest
import torch

from tests.data.conditions.photos import photo
from tests.data.conditions.tiny_models import tiny_depth_model, tiny_segmentation_model
from zeroconv.data.conditions import get_extractor
from zeroconv.data.conditions.differentiable import SUPPORTED, check_differentiable, differentiable_distance
from zeroconv.errors import UserError


def tensor(image) -> torch.Tensor:
    """[1, C, H, W] in [0, 1], as the training batches hold images and conditions."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def grad_of(distance, images, conditions) -> torch.Tensor:
    images = images.clone().requires_grad_(True)
    distance(images, conditions).sum().backward()
    assert torch.isfinite(images.grad).all()
    return images.grad


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    return tiny_depth_model(tmp_path_factory.mktemp("depth"))


@pytest.fixture(scope="module")
def segmentation_model(tmp_path_factory):
    """The tiny Segformer made confident (its classifier scaled up), so its own map costs almost nothing: scaling
    the logits keeps the argmax, i.e. the pipeline's map."""
    from transformers import SegformerForSemanticSegmentation

    path = tiny_segmentation_model(tmp_path_factory.mktemp("seg"), num_labels=5)
    model = SegformerForSemanticSegmentation.from_pretrained(path)
    with torch.no_grad():  # its random logits differ by about 1e-4 between classes: by about 10 after this
        model.decode_head.classifier.weight.mul_(1e5)
    model.save_pretrained(path)
    return path


def test_blur_is_cv2s_gaussian_at_the_fixed_sigma():
    image, other = photo(48, 40, seed=1), photo(48, 40, seed=2)
    distance = differentiable_distance("blur", {"sigma": "2.5"})
    given = tensor(get_extractor("blur", sigma=2.5)(image))
    assert float(distance(tensor(image), given)) < 1e-5  # cv2 rounds to 8 bits
    assert float(distance(tensor(other), given)) > 1e-3
    assert float(distance(tensor(image), tensor(get_extractor("blur")(image)))) > 1e-5  # sigma 4: another blur
    assert float(grad_of(distance, tensor(other), given).abs().sum()) > 0


@pytest.mark.parametrize("output", ["masked", "rgba"])
def test_inpaint_compares_only_the_known_pixels(output):
    image = photo(48, 48, seed=3)
    hole = np.asarray(get_extractor("inpaint", output="mask")(image, np.random.default_rng(5)))[..., 0] > 0
    given = tensor(get_extractor("inpaint", output=output)(image, np.random.default_rng(5)))
    distance = differentiable_distance("inpaint", {"output": output}, channels=given.shape[1])
    images = tensor(image)
    assert float(distance(images, given)) == 0
    filled = images.clone()
    filled[:, :, torch.from_numpy(hole)] = torch.rand(3, int(hole.sum()), generator=torch.Generator().manual_seed(0))
    assert float(distance(filled, given)) == 0  # what the model paints into the hole is its own
    wrong = tensor(photo(48, 48, seed=4))
    assert float(distance(wrong, given)) > 1e-3
    grad = grad_of(distance, wrong, given)
    assert float(grad[:, :, torch.from_numpy(hole)].abs().max()) == 0
    assert float(grad[:, :, torch.from_numpy(~hole)].abs().sum()) > 0


def test_depth_matches_the_pipelines_map_and_the_model_is_frozen_in_the_weight_dtype(depth_model):
    extractor = get_extractor("depth", model=str(depth_model), device="cpu")
    distance = differentiable_distance("depth", {"model": str(depth_model)})
    for size in ((32, 32), (56, 40)):  # the processor's size, and a resize both ways
        image, other = photo(*size, seed=6), photo(*size, seed=7)
        given = tensor(extractor(image))
        perfect, wrong = float(distance(tensor(image), given)), float(distance(tensor(other), given))
        assert perfect < 1e-4 and wrong > 100 * perfect, (size, perfect, wrong)  # 8-bit rounding only
        assert float(grad_of(distance, tensor(other), given).abs().sum()) > 0
    assert all(not p.requires_grad for p in distance.net.parameters()) and not distance.net.training
    half = differentiable_distance("depth", {"model": str(depth_model)}, dtype=torch.bfloat16)
    assert {p.dtype for p in half.net.parameters()} == {torch.bfloat16}
    value = half(tensor(image), given)
    assert value.dtype == torch.float32 and torch.isfinite(value).all()


def test_segmentation_recovers_the_class_ids_and_its_own_map_costs_least(segmentation_model):
    extractor = get_extractor("segmentation", model=str(segmentation_model), device="cpu")
    distance = differentiable_distance("segmentation", {"model": str(segmentation_model)})
    image, other = photo(40, 40, seed=8), photo(40, 40, seed=9)
    ids = torch.from_numpy(extractor.class_map(np.asarray(image))).long()
    given = tensor(extractor(image))
    assert torch.equal(distance.class_ids(given)[0], ids)
    shuffled = torch.roll(given, shifts=(20, 20), dims=(2, 3))
    assert not torch.equal(distance.class_ids(shuffled), distance.class_ids(given))
    perfect, wrong = float(distance(tensor(image), given)), float(distance(tensor(image), shuffled))
    assert perfect < 0.05 and wrong > 1.0, (perfect, wrong)
    assert float(distance(tensor(other), given)) > 1.0
    assert float(grad_of(distance, tensor(other), given).abs().sum()) > 0
    assert all(not p.requires_grad for p in distance.net.parameters()) and not distance.net.training


def test_what_cannot_be_re_extracted_is_refused_with_the_flag_named(tmp_path):
    with pytest.raises(UserError, match="--consistency_condition_options sigma_max=8.0: a blur of random strength"):
        check_differentiable("blur", {"sigma_max": "8"})
    with pytest.raises(UserError, match="--consistency_condition inpaint with output=mask: the mask holds nothing"):
        check_differentiable("inpaint", {"output": "mask"})
    with pytest.raises(UserError, match="rgba.*--conditioning_channels 4"):
        check_differentiable("inpaint", {"output": "rgba"}, channels=3)
    with pytest.raises(UserError, match="--conditioning_channels 1"):
        check_differentiable("segmentation", channels=1)
    with pytest.raises(UserError, match="--consistency_condition palette: no differentiable extractor") as error:
        check_differentiable("palette")
    assert all(name in str(error.value) for name in SUPPORTED)
    assert set(SUPPORTED) == {"canny", "scribble", "softedge", "lineart", "grayscale", "blur", "inpaint", "depth",
                              "segmentation"}
    with pytest.raises(UserError, match="--consistency_condition_options model: not an option of the blur"):
        check_differentiable("blur", {"model": "x"})
    with pytest.raises(UserError, match="--consistency_condition_options low: not an option of the canny"):
        check_differentiable("canny", {"low": "50"})
    with pytest.raises(UserError, match="--consistency_condition_options blur: option sigma='soft' should be a"):
        check_differentiable("blur", {"sigma": "soft"})
    with pytest.raises(UserError, match="--consistency_condition inpaint, --consistency_condition_options: output"):
        check_differentiable("inpaint", {"output": "holes"})
    build = check_differentiable("depth", {"model": str(tmp_path / "nowhere")})  # checked, nothing loaded yet
    with pytest.raises(UserError, match=r"--consistency_condition_options model=.*nowhere: cannot load it"):
        build("cpu", torch.float32)
