"""`zeroconv bench --on_paper` (zeroconv.bench_paper): its FLOP and saved-tensor counts against hand formulas on
a two-Linear "ControlNet + frozen denoiser", the memory arithmetic of the recipes, and the command on tiny
shapes of the UNet and Flux kinds."""

import json
from types import SimpleNamespace

import pytest
import torch

from zeroconv.bench import main as bench_main
from zeroconv.bench_paper import (GPUS, FlashAttentionOnMeta, SavedTensorMeter, largest_batch, measure_step,
                                  recipe_memory)
from zeroconv.errors import UserError

BATCH, IN, HIDDEN, OUT = 3, 5, 7, 11


class LinearStep(torch.nn.Module):
    """x -> ControlNet Linear (trainable) -> relu -> frozen denoiser Linear: the residual is the ControlNet's
    output, as in the real steps the denoiser's input depends on the ControlNet only through residuals."""

    def __init__(self):
        super().__init__()
        with torch.device("meta"):
            self.controlnet, self.denoiser = torch.nn.Linear(IN, HIDDEN), torch.nn.Linear(HIDDEN, OUT)
        self.denoiser.requires_grad_(False)
        self.models = SimpleNamespace(controlnet=self.controlnet, denoiser=self.denoiser)
        self.__dict__["module"] = self  # the step protocol: `module` to call; not a child (a cycle)

    def inputs(self, batch, dtype):
        return {"x": torch.randn(batch, IN, device="meta", dtype=dtype)}

    def forward(self, inputs):
        self.residuals = [self.controlnet(inputs["x"])]
        return self.denoiser(torch.relu(self.residuals[0]))


def test_linear_step_flops_and_saved_bytes_match_the_formulas():
    result = measure_step(LinearStep(), BATCH, torch.float32, {}, split_backward=True)
    assert result["forward_flops"] == {"controlnet": 2 * BATCH * IN * HIDDEN, "denoiser": 2 * BATCH * HIDDEN * OUT}
    # backward: the frozen denoiser only passes the gradient to its input (no weight grad); the ControlNet's input
    # needs no gradient, so it takes only its weight grad
    assert result["backward_flops"] == {"denoiser": 2 * BATCH * HIDDEN * OUT, "controlnet": 2 * BATCH * IN * HIDDEN}
    assert result["backward_total"] == 2 * BATCH * (HIDDEN * OUT + IN * HIDDEN)
    assert result["controlnet_grads"] == 2 and result["denoiser_grads"] == 0
    # saved for backward: x (the ControlNet's weight grad), relu's output, the loss's square input; never a weight
    assert result["saved_bytes"] == 4 * BATCH * (IN + HIDDEN + OUT)


def test_saved_tensor_meter_counts_a_storage_once_and_no_weights():
    with torch.device("meta"):
        layer = torch.nn.Linear(4, 6)
        a = torch.empty(8, 4)
    meter = SavedTensorMeter(layer)
    meter.record_inputs([a, a.t(), a[:2], layer.weight, layer.weight.t(), "not a tensor"])
    assert meter.bytes == 8 * 4 * 4  # one storage, its full size
    assert meter.tensor_bytes == 8 * 4 * 4 * 2 + 2 * 4 * 4  # per tensor object: views counted again


def test_attention_on_meta_is_counted_and_saved_as_flash_attention():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    batch, heads, tokens, width = 2, 3, 64, 8
    q = torch.randn(batch, heads, tokens, width, device="meta", requires_grad=True)
    meter = SavedTensorMeter()
    from torch.utils.flop_counter import FlopCounterMode

    with FlashAttentionOnMeta(), FlopCounterMode(display=False) as counter, meter.hooks():
        F.scaled_dot_product_attention(q, q, q)
    assert F.scaled_dot_product_attention is original
    assert counter.get_total_flops() == 2 * (2 * batch * heads * tokens * tokens * width)  # q k^T and p v
    assert max(t.numel() for t in meter.kept) == batch * heads * tokens * width  # no tokens x tokens matrix
    # q (once: q, k, v are one tensor), the output, the logsumexp and the kernel's RNG state
    assert meter.bytes < 3 * batch * heads * tokens * width * 4
    meter = SavedTensorMeter()  # the math path outside: it saves the attention matrix
    with meter.hooks():
        F.scaled_dot_product_attention(q, q, q)
    assert meter.bytes > batch * heads * tokens * tokens * 4


def test_recipe_memory_and_largest_batch():
    parameters = {"controlnet": 10, "denoiser": 100, "vae": 7, "vae_encoder": 3, "text:a": 3}
    bf16 = recipe_memory(parameters, "bf16", cached=False)
    assert bf16 == {"controlnet_weights_grads_adamw": 160, "controlnet_autocast_copy": 20, "denoiser": 200,
                    "vae_and_text_encoders": 20, "total": 400}
    fp32 = recipe_memory(parameters, "fp32", cached=True)
    assert fp32 == {"controlnet_weights_grads_adamw": 160, "controlnet_autocast_copy": 0, "denoiser": 400,
                    "vae_and_text_encoders": 0, "total": 560}
    # 100 bytes a sample, 10 that do not grow with the batch: (1000 - 400 - 10) // 100
    assert largest_batch(1000, 400, activations_1=110, activations_b=410, batch=4) == 5
    assert largest_batch(300, 400, activations_1=110, activations_b=410, batch=4) == 0


def test_on_paper_command_on_the_tiny_unet(tmp_path, capsys):
    out = tmp_path / "paper.json"
    assert bench_main(["--on_paper", "--families", "tiny", "--batch_size", "2", "--mfu", "0.5",
                       "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["on_paper"]
    assert r["family"] == "tiny" and r["resolution"] == 64 and r["batch"] == 2
    f, p = r["flops_per_sample"], r["parameters"]
    assert p["controlnet"] > 0 and p["denoiser"] > 0
    parts = f["controlnet_forward"] + f["denoiser_forward"] + f["controlnet_backward"] + f["denoiser_backward"]
    assert parts == f["training_step"] == f["cached"]
    assert min(f["controlnet_backward"], f["denoiser_backward"]) > 0
    assert f["training_step_gc"] > f["training_step"]  # checkpointed blocks are recomputed
    assert f["uncached"] == f["cached"] + f["vae_encode"] + f["text:CLIP"] > f["cached"]
    gpu = next(iter(GPUS))
    assert r["samples_per_s"][f"{gpu}|bf16|cached"] == pytest.approx(0.5 * GPUS[gpu]["bf16"] / f["cached"])
    steps = r["steps"]
    for key, step in steps.items():
        assert step["controlnet_grads"] > 0 and step["denoiser_grads"] == 0, key
    for dtype in ("fp32", "bf16"):
        assert 0 < steps[f"{dtype}|gc=on|batch=1"]["saved_bytes"] < steps[f"{dtype}|gc=off|batch=1"]["saved_bytes"]
        assert steps[f"{dtype}|gc=off|batch=2"]["saved_bytes"] > steps[f"{dtype}|gc=off|batch=1"]["saved_bytes"]
    assert steps["bf16|gc=off|batch=2"]["saved_bytes"] < steps["fp32|gc=off|batch=2"]["saved_bytes"]
    memory = {(m["dtype"], m["cached"], m["gradient_checkpointing"]): m for m in r["memory"]}
    assert len(memory) == 8
    cached, uncached = memory[("bf16", True, False)], memory[("bf16", False, False)]
    assert cached["fixed_bytes"]["total"] < uncached["fixed_bytes"]["total"]
    assert cached["total_batch2_bytes"] == cached["fixed_bytes"]["total"] + cached["activations_batch2_bytes"]
    printed = capsys.readouterr().out
    for heading in ("Parameters (millions)", "FLOPs per sample", "Samples/s at MFU 0.50", "Memory per recipe"):
        assert heading in printed


@pytest.mark.parametrize("family", ["tiny-sd3", "tiny-flux"])
def test_transformer_kinds_train_on_meta(family):
    """The SD3 and Flux steps run on meta with checkpointing: only the ControlNet gets gradients, and the
    frozen VAE encodes both the target and the condition image."""
    from zeroconv.bench_paper import TrainingStep, build_models, encoder_flops, set_gradient_checkpointing

    models = build_models(family, 64)
    step, box = TrainingStep(models), {}
    plain = measure_step(step, 1, torch.float32, box, split_backward=True)
    set_gradient_checkpointing(models, True, box)
    checkpointed = measure_step(step, 1, torch.float32, box)
    for result in (plain, checkpointed):
        # (SD3's ControlNet leaves the prompt branch of its last block unused: those get no gradient)
        assert 0.8 * len(list(models.controlnet.parameters())) < result["controlnet_grads"]
        assert result["denoiser_grads"] == 0
    assert min(plain["backward_flops"].values()) > 0
    assert checkpointed["backward_total"] > plain["backward_total"]
    assert 0 < checkpointed["saved_bytes"] < plain["saved_bytes"]
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as one_encode:
        models.vae.encode(torch.randn(1, 3, 64, 64, device="meta"))
    assert encoder_flops(models)["vae_encode"] == 2 * one_encode.get_total_flops() > 0


@pytest.mark.parametrize("flags, flag", [(["--families", "sd4"], "--families"), (["--mfu", "0"], "--mfu"),
                                         (["--batch_size", "1"], "--batch_size"),
                                         (["--resolution", "100"], "--resolution")])
def test_on_paper_user_errors_name_the_flag(flags, flag):
    with pytest.raises(UserError, match=flag):
        bench_main(["--on_paper", "--families", "tiny", *flags] if flag != "--families" else ["--on_paper", *flags])
