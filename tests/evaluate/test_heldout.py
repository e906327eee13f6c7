"""conditioned_losses on a Flux union ControlNet (tiny random base): the control types the held-out dataset gives
reach the family's encode_condition and denoise, so each type is measured with its own condition and mode."""

import torch

from zeroconv.config import TrainConfig
from zeroconv.data.sources import load_examples
from zeroconv.evaluate.heldout import conditioned_losses
from zeroconv.models.base import load_base
from zeroconv.testing import make_union_dataset
from zeroconv.train.setup import build_dataset


def test_union_controlnet_is_measured_per_condition_type(tiny_flux_base, tmp_path):
    base = load_base(str(tiny_flux_base))
    base.max_sequence_length = 8
    data = make_union_dataset(tmp_path / "data", n=4, columns=("mask", "outline"))
    controlnet = base.family.build_union_controlnet(base, 2, num_double_layers=1, num_single_layers=1).eval()

    def losses(weights: str) -> dict:
        cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_flux_base), train_data_dir=str(data), resolution=64,
                          conditioning_image_columns="mask,outline", union_condition_weights=weights)
        return conditioned_losses(base, controlnet, build_dataset(cfg, load_examples(cfg), 0), draws=1)

    assert losses("1,0")["gap"] == 0.0  # untrained: its output is zero whatever the condition
    with torch.no_grad():  # as if trained: the condition and the mode now reach the transformer
        for module in (controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks,
                       *controlnet.controlnet_single_blocks):
            module.weight.normal_(std=0.5)
    mask, outline = losses("1,0"), losses("0,1")
    assert mask["gap"] != 0.0 and outline["gap"] != 0.0
    assert mask["true"] != outline["true"]  # another type: another condition image and control mode
