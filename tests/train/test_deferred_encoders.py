"""A run served by a complete latent cache never constructs its text encoders (issue 15: T5 is most of SD3's and
Flux's frozen weights; issue 14: start-up): they are Deferred (config only) until a cache is built, a batch is
encoded live, or a validation samples. The run trains the same steps either way."""

import pytest
import torch

from tests.train.helpers import controlnet_weights, losses, run_training, tiny_config

FAMILY_OPTIONS = {"tiny_base": {}, "tiny_sd3_base": {"num_layers": 1},
                  "tiny_flux_base": {"num_double_layers": 1, "num_single_layers": 1, "max_sequence_length": 16}}


def forbid_text_encoders(monkeypatch):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    def boom(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} constructed in a run the latent cache serves")

    for model_class in (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel):
        monkeypatch.setattr(model_class, "__init__", boom)


@pytest.mark.parametrize("base_fixture", sorted(FAMILY_OPTIONS))
def test_a_run_the_cache_serves_constructs_no_text_encoder(base_fixture, request, tiny_dataset, tmp_path,
                                                             monkeypatch):
    base = request.getfixturevalue(base_fixture)
    options = dict(cache="on", latent_cache_dir=str(tmp_path / "cache"), max_train_steps=3, **FAMILY_OPTIONS[base_fixture])
    assert run_training(tiny_config(base, tiny_dataset, tmp_path / "builds", **options)) == 0  # builds the cache
    with monkeypatch.context() as patched:
        forbid_text_encoders(patched)
        assert run_training(tiny_config(base, tiny_dataset, tmp_path / "served", **options)) == 0
    a, b = controlnet_weights(tmp_path / "builds"), controlnet_weights(tmp_path / "served")
    assert losses(tmp_path / "builds") == losses(tmp_path / "served")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deferred_encoders_load_for_live_encoding_and_validation(tiny_base, tiny_dataset, tmp_path):
    """Deferred until needed, then loaded frozen, where and in the dtype they were moved to."""
    from zeroconv.models.base import load_base
    from zeroconv.models.parts import Deferred

    base = load_base(str(tiny_base), defer_text_encoders=True)
    assert isinstance(base.text_encoder, Deferred) and base.text_encoder.config.hidden_size == 32
    eager = load_base(str(tiny_base))
    assert base.family.prompt_shape(base) == eager.family.prompt_shape(eager)  # from the config alone
    base.text_encoder.to("cpu").to(dtype=torch.bfloat16)
    base.materialize()
    assert not isinstance(base.text_encoder, Deferred) and base.text_encoder.dtype == torch.bfloat16
    assert not base.text_encoder.training and not any(p.requires_grad for p in base.text_encoder.parameters())
    # a run that may use the cache but validates: the encoders load at the first validation
    cfg = tiny_config(tiny_base, tiny_dataset, tmp_path / "run", cache="on", latent_cache_dir=str(tmp_path / "c"),
                      validation_prompt=["a red square"],
                      validation_image=[str(next((tiny_dataset / "conditioning").glob("*.png")))],
                      validation_steps=2, max_train_steps=2, validation_inference_steps=1, num_validation_images=1)
    assert run_training(cfg) == 0
    assert (tmp_path / "run" / "validation" / "step-000002.png").is_file()
