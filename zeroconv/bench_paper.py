"""`zeroconv bench --on_paper`: the GPU figures of true-shape ControlNet training, computed on meta tensors.

No GPU is needed and nothing is downloaded: every module (the frozen denoiser, its ControlNet, the VAE and the
text encoders of SD 1.5, SDXL, SD3.5 and Flux.1-dev) is built from its published config on PyTorch's meta device,
where tensors have shapes and dtypes but no data, and one training step is run on it. That gives, per family:

- parameters of each part (the trainable ControlNet against everything frozen);
- FLOPs per sample of each part, counted by torch.utils.flop_counter.FlopCounterMode: VAE encode, each text
  encoder, ControlNet forward, denoiser forward (with the ControlNet's residuals), ControlNet backward (weight and
  activation grads) and the denoiser's backward to the residuals (activation grads only: it is frozen);
- the best case of the latent/prompt cache (it removes the VAE encode and the text encoders from every step):
  uncached FLOPs over cached FLOPs, and the samples/s an H100 or H200 would reach at a stated MFU;
- memory per recipe (fp32 or bf16 weights, cached or not, gradient checkpointing off or on): weights, gradients
  and AdamW state from the parameter counts, activations from the tensors autograd saves for backward, counted by
  torch.autograd.graph.saved_tensors_hooks at batch 1 and at the table's batch, and from them the largest batch
  that fits an 80 GB or 141 GB GPU.

Why meta tensors: the true models (Flux's 12B denoiser, T5-XXL) do not fit this machine's memory and a CPU step
would take hours; FLOPs and saved-tensor sizes depend only on shapes, which meta tensors carry exactly.

Attention: on meta (as on CPU) scaled_dot_product_attention falls back to its math path, which saves the full
attention matrix for backward, and a GPU does not: flash attention saves q, k, v, the output and a logsumexp.
So every unmasked attention on meta is routed to aten._scaled_dot_product_flash_attention (it has meta kernels,
autograd and FLOP formulas), which counts what an H100 runs and saves what it saves. Its backward formula is 2.5x
the forward (it recomputes q @ k^T), so these are hardware FLOPs, not the 2x "model FLOPs" convention.

    zeroconv bench --on_paper                                  # sd15 512 px, sdxl sd35 flux 1024 px
    zeroconv bench --on_paper --families flux --resolution 512 --mfu 0.3 --json flux.json
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from zeroconv.errors import EXIT_OK, UserError

# ----------------------------------------------------------------------------------------------------------------
# The published configs (diffusers' / transformers' config.json of each model, written out so nothing downloads)
# ----------------------------------------------------------------------------------------------------------------

# runwayml/stable-diffusion-v1-5 unet/config.json: UNet2DConditionModel's defaults are SD 1.5's except these
SD15_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# The 4-channel VAE of SD 1.x and SDXL (same architecture; SDXL's weights differ)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4)
# The 16-channel VAE of SD3/SD3.5 and Flux.1 (no quant convs)
VAE16 = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
# openai/clip-vit-large-patch14's text tower (SD 1.5's text_encoder, SDXL's, SD3's and Flux's CLIP-L)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# laion/CLIP-ViT-bigG-14's text tower: SDXL's text_encoder_2, SD3's CLIP-G
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# google/t5-v1_1-xxl's encoder: SD3's text_encoder_3 and Flux's text_encoder_2
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
# stabilityai/stable-diffusion-3.5-large and -medium transformer/config.json
SD35_LARGE = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=())
SD35_MEDIUM = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))

# Tiny shapes of the same three kinds, for the tests: every code path in seconds
TINY_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                 cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(SD_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
TINY_CLIP = dict(CLIP_L, vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, projection_dim=32)
TINY_T5 = dict(T5_XXL, vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TINY_SD3 = dict(SD35_LARGE, num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)
TINY_FLUX = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


@dataclass
class TextEncoderSpec:
    name: str
    kind: str  # "clip" (CLIPTextModel), "clip_projection" (CLIPTextModelWithProjection) or "t5" (T5EncoderModel)
    config: dict
    tokens: int  # prompt length the training script encodes to


@dataclass
class FamilySpec:
    label: str
    kind: str  # "unet" (SD 1.x / SDXL ControlNetModel), "sd3" or "flux"
    resolution: int
    denoiser: dict
    vae: dict
    text_encoders: list[TextEncoderSpec]
    controlnet: dict = field(default_factory=dict)  # what the ControlNet changes from the denoiser's config
    controlnet_note: str = ""
    # SD/SDXL ControlNets embed the condition image with their own (trainable) conditioning encoder; the SD3 and
    # Flux scripts encode it with the frozen VAE, so their uncached step runs the VAE encoder twice
    vae_encodes: int = 1


FAMILIES: dict[str, FamilySpec] = {
    "sd15": FamilySpec(
        "Stable Diffusion 1.5", "unet", 512, SD15_UNET, SD_VAE, [TextEncoderSpec("CLIP-L", "clip", CLIP_L, 77)],
        controlnet_note="ControlNetModel.from_unet (conditioning_channels 3)"),
    "sdxl": FamilySpec(
        "Stable Diffusion XL 1.0", "unet", 1024, SDXL_UNET, SD_VAE,
        [TextEncoderSpec("CLIP-L", "clip", CLIP_L, 77),
         TextEncoderSpec("OpenCLIP-bigG", "clip_projection", CLIP_BIGG, 77)],
        controlnet_note="ControlNetModel.from_unet (conditioning_channels 3)"),
    "sd35": FamilySpec(
        "Stable Diffusion 3.5 Large", "sd3", 1024, SD35_LARGE, VAE16,
        [TextEncoderSpec("CLIP-L", "clip_projection", CLIP_L, 77),
         TextEncoderSpec("CLIP-G", "clip_projection", CLIP_BIGG, 77),
         TextEncoderSpec("T5-XXL", "t5", T5_XXL, 77)],
        controlnet=dict(num_layers=12, extra_conditioning_channels=0),
        controlnet_note="SD3ControlNetModel.from_transformer defaults of diffusers' train_controlnet_sd3.py: "
        "num_layers 12, num_extra_conditioning_channels 0; T5 at its --max_sequence_length 77",
        vae_encodes=2),
    "sd35m": FamilySpec(
        "Stable Diffusion 3.5 Medium", "sd3", 1024, SD35_MEDIUM, VAE16,
        [TextEncoderSpec("CLIP-L", "clip_projection", CLIP_L, 77),
         TextEncoderSpec("CLIP-G", "clip_projection", CLIP_BIGG, 77),
         TextEncoderSpec("T5-XXL", "t5", T5_XXL, 77)],
        controlnet=dict(num_layers=12, extra_conditioning_channels=0, dual_attention_layers=tuple(range(12))),
        controlnet_note="SD3ControlNetModel, train_controlnet_sd3.py's defaults: num_layers 12, "
        "num_extra_conditioning_channels 0; T5 at --max_sequence_length 77",
        vae_encodes=2),
    "flux": FamilySpec(
        "FLUX.1-dev", "flux", 1024, FLUX_DEV, VAE16,
        [TextEncoderSpec("CLIP-L", "clip", CLIP_L, 77), TextEncoderSpec("T5-XXL", "t5", T5_XXL, 512)],
        controlnet=dict(num_layers=4, num_single_layers=4),
        controlnet_note="FluxControlNetModel.from_transformer as diffusers' train_controlnet_flux.py: "
        "--num_double_layers 4, --num_single_layers 4; T5 at the pipeline's max_sequence_length 512",
        vae_encodes=2),
    "tiny": FamilySpec("tiny UNet (tests)", "unet", 64, TINY_UNET, TINY_VAE,
                       [TextEncoderSpec("CLIP", "clip", TINY_CLIP, 77)], controlnet_note="ControlNetModel.from_unet"),
    "tiny-sd3": FamilySpec("tiny SD3 (tests)", "sd3", 64, TINY_SD3, dict(TINY_VAE, latent_channels=16),
                           [TextEncoderSpec("CLIP", "clip_projection", TINY_CLIP, 77),
                            TextEncoderSpec("CLIP-2", "clip_projection", TINY_CLIP, 77),
                            TextEncoderSpec("T5", "t5", TINY_T5, 16)],
                           controlnet=dict(num_layers=1, extra_conditioning_channels=0),
                           controlnet_note="SD3ControlNetModel, 1 layer", vae_encodes=2),
    "tiny-flux": FamilySpec("tiny Flux (tests)", "flux", 64, TINY_FLUX, dict(TINY_VAE, latent_channels=16),
                            [TextEncoderSpec("CLIP", "clip", TINY_CLIP, 77), TextEncoderSpec("T5", "t5", TINY_T5, 16)],
                            controlnet=dict(num_layers=1, num_single_layers=1),
                            controlnet_note="FluxControlNetModel, 1 + 1 layers", vae_encodes=2),
}
DEFAULT_FAMILIES = ["sd15", "sdxl", "sd35", "flux"]

# Dense (no sparsity) peaks from NVIDIA's H100 SXM and H200 datasheets: the same chip, H200 has more and faster
# memory. fp32 is the CUDA-core rate: an fp32 recipe without TF32 runs its matmuls there.
GPUS = {
    "H100 SXM 80GB": dict(bf16=989e12, fp32=67e12, memory_bytes=81559 * 2**20),
    "H200 141GB": dict(bf16=989e12, fp32=67e12, memory_bytes=143771 * 2**20),
}  # memory: what nvidia-smi reports as total (79.6 GiB, 140.4 GiB), before the CUDA context
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


# ----------------------------------------------------------------------------------------------------------------
# Building on meta
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Models:
    spec: FamilySpec
    resolution: int
    controlnet: object
    denoiser: object
    vae: object
    text_encoders: dict  # name -> module

    def parameters(self) -> dict[str, int]:
        count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0  # noqa: E731
        out = {"controlnet": count(self.controlnet), "denoiser": count(self.denoiser),
               "vae_encoder": count(self.vae.encoder) + count(getattr(self.vae, "quant_conv", None)),
               "vae": count(self.vae)}
        out.update({f"text:{name}": count(module) for name, module in self.text_encoders.items()})
        return out


def build_text_encoder(spec: TextEncoderSpec):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if spec.kind == "t5":
        return T5EncoderModel(T5Config(**spec.config))
    cls = CLIPTextModelWithProjection if spec.kind == "clip_projection" else CLIPTextModel
    return cls(CLIPTextConfig(**spec.config))


def build_models(name: str, resolution: int) -> Models:
    """Every part of `name` at its published shape, on the meta device (no memory, no download)."""
    import torch
    from diffusers import AutoencoderKL

    spec = FAMILIES[name]
    latent_size = resolution // 8
    with torch.device("meta"):
        if spec.kind == "unet":
            from diffusers import ControlNetModel, UNet2DConditionModel

            denoiser = UNet2DConditionModel(sample_size=latent_size, **spec.denoiser)
            controlnet = ControlNetModel.from_unet(denoiser, load_weights_from_unet=False, **spec.controlnet)
        elif spec.kind == "sd3":
            from diffusers import SD3ControlNetModel, SD3Transformer2DModel

            denoiser = SD3Transformer2DModel(sample_size=latent_size, **spec.denoiser)
            controlnet = SD3ControlNetModel(sample_size=latent_size, **{**spec.denoiser, **spec.controlnet})
        else:
            from diffusers import FluxControlNetModel, FluxTransformer2DModel

            denoiser = FluxTransformer2DModel(**spec.denoiser)
            controlnet = FluxControlNetModel(**{**spec.denoiser, **spec.controlnet})
        vae = AutoencoderKL(sample_size=resolution, **spec.vae)
        text_encoders = {t.name: build_text_encoder(t) for t in spec.text_encoders}
    for frozen in (denoiser, vae, *text_encoders.values()):
        frozen.requires_grad_(False)
    controlnet.train()
    return Models(spec, resolution, controlnet, denoiser, vae, text_encoders)


class TrainingStep:
    """One ControlNet training forward of a family's kind: ControlNet, then the frozen denoiser with its residuals.

    Holds the two models as children of one torch module, so FlopCounterMode's module tracker attributes each
    forward FLOP to `controlnet` or `denoiser`, and keeps the residuals of the last forward (`module.residuals`),
    so the backward through the denoiser alone can be taken to them."""

    def __init__(self, models: Models):
        import torch

        class Step(torch.nn.Module):
            def __init__(self, controlnet, denoiser, forward):
                super().__init__()
                self.controlnet, self.denoiser, self._forward = controlnet, denoiser, forward

            def forward(self, inputs):
                prediction, self.residuals = self._forward(self.controlnet, self.denoiser, inputs)
                return prediction

        self.models = models
        self.module = Step(models.controlnet, models.denoiser, getattr(self, f"forward_{models.spec.kind}"))

    def inputs(self, batch: int, dtype) -> dict:
        """Meta tensors of the shapes the training scripts feed (prompt embeddings as the text encoders emit)."""
        import torch

        spec, side = self.models.spec, self.models.resolution // 8
        d = spec.denoiser
        rand = lambda *shape: torch.randn(*shape, device="meta", dtype=dtype)  # noqa: E731
        if spec.kind == "unet":
            out = dict(latents=rand(batch, d["in_channels"], side, side),
                       timesteps=torch.randint(0, 1000, (batch,), device="meta"),
                       prompt=rand(batch, spec.text_encoders[0].tokens, d["cross_attention_dim"]),
                       condition=rand(batch, 3, self.models.resolution, self.models.resolution))
            if d.get("addition_embed_type") == "text_time":
                pooled = d["projection_class_embeddings_input_dim"] - 6 * d["addition_time_embed_dim"]
                out["added"] = dict(text_embeds=rand(batch, pooled), time_ids=rand(batch, 6))
            return out
        t5_tokens = next(t.tokens for t in spec.text_encoders if t.kind == "t5")
        if spec.kind == "sd3":  # prompt: CLIP-L and CLIP-G's 77 tokens (padded to T5's width) then T5's
            return dict(latents=rand(batch, 16, side, side), condition=rand(batch, 16, side, side),
                        timesteps=torch.rand(batch, device="meta") * 1000,
                        prompt=rand(batch, 77 + t5_tokens, d["joint_attention_dim"]),
                        pooled=rand(batch, d["pooled_projection_dim"]))
        tokens = (side // 2) ** 2  # Flux packs 2x2 latent patches into 64-channel tokens
        return dict(latents=rand(batch, tokens, d["in_channels"]), condition=rand(batch, tokens, d["in_channels"]),
                    timesteps=torch.rand(batch, device="meta"), guidance=torch.full((batch,), 3.5, device="meta"),
                    prompt=rand(batch, t5_tokens, d["joint_attention_dim"]),
                    pooled=rand(batch, d["pooled_projection_dim"]),
                    text_ids=torch.zeros(t5_tokens, 3, device="meta"),
                    image_ids=torch.zeros(tokens, 3, device="meta"))

    @staticmethod
    def forward_unet(controlnet, unet, x):
        added = x.get("added")
        down, mid = controlnet(x["latents"], x["timesteps"], encoder_hidden_states=x["prompt"],
                               controlnet_cond=x["condition"], added_cond_kwargs=added, return_dict=False)
        return unet(x["latents"], x["timesteps"], encoder_hidden_states=x["prompt"], added_cond_kwargs=added,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    return_dict=False)[0], [*down, mid]

    @staticmethod
    def forward_sd3(controlnet, transformer, x):
        residuals = controlnet(hidden_states=x["latents"], controlnet_cond=x["condition"], timestep=x["timesteps"],
                               encoder_hidden_states=x["prompt"], pooled_projections=x["pooled"],
                               return_dict=False)[0]
        return transformer(hidden_states=x["latents"], timestep=x["timesteps"], encoder_hidden_states=x["prompt"],
                           pooled_projections=x["pooled"], block_controlnet_hidden_states=residuals,
                           return_dict=False)[0], list(residuals)

    @staticmethod
    def forward_flux(controlnet, transformer, x):
        common = dict(hidden_states=x["latents"], timestep=x["timesteps"], guidance=x["guidance"],
                      pooled_projections=x["pooled"], encoder_hidden_states=x["prompt"], txt_ids=x["text_ids"],
                      img_ids=x["image_ids"], return_dict=False)
        double, single = controlnet(controlnet_cond=x["condition"], **common)
        prediction = transformer(controlnet_block_samples=double, controlnet_single_block_samples=single,
                                 **common)[0]
        return prediction, [*double, *single]


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------

class FlashAttentionOnMeta:
    """Runs unmasked scaled_dot_product_attention on meta tensors as the flash kernel, while inside `with`.

    Why: on meta, SDPA picks the math path, which saves the (heads x tokens x tokens) attention matrix for
    backward (tens of GB per Flux step at 1024 px) and a GPU's flash kernel does not. Masked calls (the CLIP
    text encoders, run without grad) keep the math path: their forward FLOPs are the same. It swaps the attribute
    torch.nn.functional.scaled_dot_product_attention, which diffusers and transformers look up at each call; a
    torch function mode would be simpler but is not active when checkpointed blocks are recomputed in backward,
    and the recomputation must take the same path as the forward."""

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        flash = torch.ops.aten._scaled_dot_product_flash_attention
        self.original = original = F.scaled_dot_product_attention

        def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False):
            if query.device.type == "meta" and attn_mask is None and not enable_gqa and not dropout_p:
                return flash(query, key, value, 0.0, bool(is_causal), scale=scale)[0]
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)

        F.scaled_dot_product_attention = attention
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self.original
        return False


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward during a forward (the activations a training step holds).

    Saved tensors are de-duplicated by storage: meta tensors have no data pointer, but each has a StorageImpl whose
    address (`untyped_storage()._cdata`) is shared by its views; the meter keeps a reference to every tensor it
    saw, so no address is freed and reused while it counts. Storages of parameters and buffers are not counted
    (they are the weights, counted apart). With gradient checkpointing, the saved tensors inside a checkpointed
    block are not kept (checkpoint's own hooks take them); what the checkpoint keeps are the block's inputs, which
    `record_inputs` adds. `tensor_bytes` is the same sum de-duplicated only by tensor object (numel *
    element_size): an upper bound, as views of one storage count once per view."""

    def __init__(self, *modules):
        self.excluded = {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}
        self.storages: dict[int, int] = {}
        self.tensors: dict[int, int] = {}
        self.kept: list = []

    def add(self, tensor) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage._cdata in self.excluded:
            return
        self.kept.append(tensor)
        self.storages[storage._cdata] = storage.nbytes()
        self.tensors[id(tensor)] = tensor.numel() * tensor.element_size()

    def record_inputs(self, args) -> None:
        for arg in args:
            self.add(arg)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(self.tensors.values())

    def hooks(self):
        import torch

        def pack(tensor):
            self.add(tensor)
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def set_gradient_checkpointing(models: Models, on: bool, meter_box: dict) -> None:
    """diffusers' enable_gradient_checkpointing on the ControlNet and the denoiser, with a checkpoint function that
    also tells the current meter what the checkpoint keeps (the block's inputs)."""
    import torch.utils.checkpoint

    def checkpointed(module, *args):
        if meter_box.get("meter") is not None:
            meter_box["meter"].record_inputs(args)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    for model in (models.controlnet, models.denoiser):
        if on:
            model.enable_gradient_checkpointing(checkpointed)
        else:
            model.disable_gradient_checkpointing()


def flops_by_part(counter, names: tuple[str, ...]) -> dict[str, int]:
    counts = counter.get_flop_counts()
    return {name: sum(n for key, per_op in counts.items() if key.endswith("." + name) and key.count(".") == 1
                      for n in per_op.values()) for name in names}


def measure_step(step: TrainingStep, batch: int, dtype, meter_box: dict, split_backward: bool = False) -> dict:
    """One training step (forward, an MSE-like loss in fp32 as the scripts compute it, backward) on meta tensors:
    FLOPs of the forward by part, of the whole backward, and the bytes saved for backward.

    With `split_backward`, the backward's share of the frozen denoiser is counted first, as the gradient of the
    loss to the ControlNet's residuals alone (autograd.grad stops there, and the denoiser has no weight grads to
    take); the ControlNet's share is the full backward's count minus it. torch's module tracker cannot make this
    split: in backward it leaves the denoiser open while the ControlNet's gradients run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inputs = step.inputs(batch, dtype)
    meter = SavedTensorMeter(step.module)
    meter_box["meter"] = meter
    parts = ("controlnet", "denoiser")
    with FlashAttentionOnMeta():
        with FlopCounterMode(display=False) as forward_counter, meter.hooks():
            prediction = step.module(inputs)
            loss = prediction.float().square().mean()
        meter_box["meter"] = None
        denoiser_backward = None
        if split_backward:
            with FlopCounterMode(display=False) as to_residuals:
                torch.autograd.grad(loss, step.module.residuals, retain_graph=True)
            denoiser_backward = to_residuals.get_total_flops()
        with FlopCounterMode(display=False) as backward_counter:
            loss.backward()
    forward = flops_by_part(forward_counter, parts)
    backward_total = backward_counter.get_total_flops()
    result = {"forward_flops": forward, "forward_total": forward_counter.get_total_flops(),
              "backward_total": backward_total,
              "backward_flops": None if denoiser_backward is None else {
                  "denoiser": denoiser_backward, "controlnet": backward_total - denoiser_backward},
              "saved_bytes": meter.bytes, "saved_tensor_bytes": meter.tensor_bytes,
              "controlnet_grads": sum(p.grad is not None for p in step.models.controlnet.parameters()),
              "denoiser_grads": sum(p.grad is not None for p in step.models.denoiser.parameters())}
    step.models.controlnet.zero_grad(set_to_none=True)
    step.module.residuals = None
    return result


def encoder_flops(models: Models) -> dict[str, int]:
    """FLOPs per sample of the frozen encoders the cache removes: the VAE encode(s) and each text encoder."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with torch.no_grad(), FlashAttentionOnMeta():
        image = torch.randn(1, 3, models.resolution, models.resolution, device="meta")
        with FlopCounterMode(display=False) as counter:
            models.vae.encode(image).latent_dist.mean
        out["vae_encode"] = counter.get_total_flops() * models.spec.vae_encodes
        for spec in models.spec.text_encoders:
            ids = torch.zeros(1, spec.tokens, dtype=torch.long, device="meta")
            with FlopCounterMode(display=False) as counter:
                models.text_encoders[spec.name](ids)
            out[f"text:{spec.name}"] = counter.get_total_flops()
    return out


def recipe_memory(parameters: dict[str, int], dtype: str, cached: bool) -> dict[str, int]:
    """Bytes a GPU holds besides activations, by recipe.

    The trainable ControlNet keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes a
    parameter) in both recipes; bf16 adds the bf16 copy of its weights that autocast casts once per step. Frozen
    parts are stored in the recipe's dtype. Cached: the VAE and text encoders stay off the GPU."""
    controlnet = parameters["controlnet"]
    width = DTYPE_BYTES[dtype]
    out = {"controlnet_weights_grads_adamw": controlnet * (4 + 4 + 4 + 4),
           "controlnet_autocast_copy": controlnet * 2 if dtype == "bf16" else 0,
           "denoiser": parameters["denoiser"] * width,
           "vae_and_text_encoders": 0 if cached else width * (parameters["vae"] + sum(
               n for key, n in parameters.items() if key.startswith("text:")))}
    out["total"] = sum(out.values())
    return out


def largest_batch(capacity: int, fixed: int, activations_1: int, activations_b: int, batch: int) -> int:
    """The largest batch whose fixed memory plus activations fits `capacity`; activations are linear in the batch
    (a per-sample slope from batch 1 and `batch`, plus what does not grow with it)."""
    per_sample = (activations_b - activations_1) / (batch - 1)
    constant = activations_1 - per_sample
    if per_sample <= 0:
        return 0
    return max(0, int((capacity - fixed - constant) // per_sample))


def family_figures(name: str, resolution: int, batch: int, mfu: float, log=print) -> dict:
    """Every figure of one family (see the module docstring), as a JSON-able dict."""
    import torch

    started = time.perf_counter()
    models = build_models(name, resolution)
    parameters = models.parameters()
    encoders = encoder_flops(models)
    step, meter_box = TrainingStep(models), {}
    steps = {}
    for dtype in ("fp32", "bf16"):
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        for module in (models.controlnet, models.denoiser):
            module.to(torch_dtype)  # (diffusers would warn here of modules to keep in fp32: these list none)
        for gc in (False, True):
            set_gradient_checkpointing(models, gc, meter_box)
            for b in (1, batch):
                steps[(dtype, gc, b)] = measure_step(step, b, torch_dtype, meter_box,
                                                      split_backward=(dtype, gc, b) == ("bf16", False, 1))
        log(f"  {name}: {dtype} steps measured ({time.perf_counter() - started:.0f} s)")
    base = steps[("bf16", False, 1)]
    flops = {"controlnet_forward": base["forward_flops"]["controlnet"],
             "denoiser_forward": base["forward_flops"]["denoiser"],
             "controlnet_backward": base["backward_flops"]["controlnet"],
             "denoiser_backward": base["backward_flops"]["denoiser"]}
    flops["training_step"] = base["forward_total"] + base["backward_total"]
    flops["training_step_gc"] = (steps[("bf16", True, 1)]["forward_total"]
                                 + steps[("bf16", True, 1)]["backward_total"])
    flops.update(encoders)
    flops["encoders"] = sum(encoders.values())
    flops["uncached"] = flops["training_step"] + flops["encoders"]
    flops["cached"] = flops["training_step"]
    speed = {}
    for gpu, peaks in GPUS.items():
        for dtype in ("bf16", "fp32"):
            for variant in ("uncached", "cached"):
                speed[f"{gpu}|{dtype}|{variant}"] = mfu * peaks[dtype] / flops[variant]
    memory = []
    for dtype in ("fp32", "bf16"):
        for cached in (False, True):
            for gc in (False, True):
                fixed = recipe_memory(parameters, dtype, cached)
                act1, actb = steps[(dtype, gc, 1)]["saved_bytes"], steps[(dtype, gc, batch)]["saved_bytes"]
                memory.append({
                    "dtype": dtype, "cached": cached, "gradient_checkpointing": gc, "fixed_bytes": fixed,
                    "activations_batch1_bytes": act1, f"activations_batch{batch}_bytes": actb,
                    "activations_batch1_tensor_bytes": steps[(dtype, gc, 1)]["saved_tensor_bytes"],
                    f"total_batch{batch}_bytes": fixed["total"] + actb,
                    "largest_batch": {gpu: largest_batch(g["memory_bytes"], fixed["total"], act1, actb, batch)
                                      for gpu, g in GPUS.items()}})
    return {"family": name, "label": models.spec.label, "resolution": resolution, "batch": batch, "mfu": mfu,
            "configs": {"denoiser": _jsonable(models.spec.denoiser), "controlnet": models.spec.controlnet_note,
                        "vae": _jsonable(models.spec.vae),
                        "text_encoders": [dict(name=t.name, kind=t.kind, tokens=t.tokens, config=t.config)
                                          for t in models.spec.text_encoders],
                        "vae_encodes_per_sample": models.spec.vae_encodes},
            "parameters": parameters, "flops_per_sample": flops, "samples_per_s": speed, "memory": memory,
            "steps": {f"{d}|gc={'on' if g else 'off'}|batch={b}": v for (d, g, b), v in steps.items()},
            "seconds": time.perf_counter() - started}


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------

def _g(n: float) -> str:
    return f"{n / 1e9:,.0f}" if n >= 1e11 else f"{n / 1e9:,.1f}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def tables(results: list[dict]) -> str:
    lines = []
    batch = results[0]["batch"]
    mfu = results[0]["mfu"]
    lines += ["Configs:"]
    for r in results:
        c = r["configs"]
        texts = ", ".join(f"{t['name']} ({t['kind']}, {t['tokens']} tokens)" for t in c["text_encoders"])
        lines.append(f"  {r['family']}: {r['label']} at {r['resolution']} px; denoiser {c['denoiser']}; ControlNet: "
                     f"{c['controlnet']}; VAE latent_channels {c['vae']['latent_channels']}, encoded "
                     f"{c['vae_encodes_per_sample']}x per sample; text encoders {texts}")
    lines += ["", "Parameters (millions)", ""]
    head = f"| family | res | ControlNet (trainable) | denoiser (frozen) | VAE (encoder) | text encoders (frozen) | frozen total |"
    lines += [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["parameters"]
        texts = " + ".join(f"{k[5:]} {v / 1e6:,.0f}" for k, v in p.items() if k.startswith("text:"))
        frozen = p["denoiser"] + p["vae"] + sum(v for k, v in p.items() if k.startswith("text:"))
        lines.append(f"| {r['family']} | {r['resolution']} | {p['controlnet'] / 1e6:,.1f} | {p['denoiser'] / 1e6:,.1f} | "
                     f"{p['vae'] / 1e6:,.1f} ({p['vae_encoder'] / 1e6:,.1f}) | {texts} | {frozen / 1e6:,.0f} |")
    lines += ["", "FLOPs per sample (GFLOP, batch 1; FlopCounterMode on meta tensors, flash-attention formulas)", ""]
    lines += ["| family | VAE encode | text encoders | ControlNet fwd | denoiser fwd | ControlNet bwd | denoiser bwd "
              "(to residuals) | step | step with gc | uncached | cached | best-case speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["flops_per_sample"]
        texts = " + ".join(f"{k[5:]} {_g(v)}" for k, v in f.items() if k.startswith("text:"))
        lines.append(f"| {r['family']} | {_g(f['vae_encode'])} | {texts} | {_g(f['controlnet_forward'])} | "
                     f"{_g(f['denoiser_forward'])} | {_g(f['controlnet_backward'])} | {_g(f['denoiser_backward'])} | "
                     f"{_g(f['training_step'])} | {_g(f['training_step_gc'])} | {_g(f['uncached'])} | "
                     f"{_g(f['cached'])} | {f['uncached'] / f['cached']:.2f}x |")
    peaks = "; ".join(f"{gpu}: bf16 {g['bf16'] / 1e12:.0f}, fp32 {g['fp32'] / 1e12:.0f} TFLOP/s dense"
                      for gpu, g in GPUS.items())
    lines += ["", f"Samples/s at MFU {mfu:.2f} (peaks: {peaks}; gradient checkpointing off)", ""]
    lines += ["| family | GPU | bf16 uncached | bf16 cached | fp32 uncached | fp32 cached |", "|---|---|---|---|---|---|"]
    for r in results:
        for gpu in GPUS:
            s = r["samples_per_s"]
            lines.append(f"| {r['family']} | {gpu} | " + " | ".join(
                f"{s[f'{gpu}|{d}|{v}']:.2f}" for d in ("bf16", "fp32") for v in ("uncached", "cached")) + " |")
    gpus = list(GPUS)
    lines += ["", f"Memory per recipe (GiB; batch 1 and {batch}; activations = bytes autograd saves for backward, "
              "de-duplicated by storage)", ""]
    lines += [f"| family | dtype | cache | gc | ControlNet w+g+AdamW | autocast copy | denoiser | VAE+text | fixed | "
              f"act b1 | act b{batch} | total b1 | total b{batch} | max batch {gpus[0].split()[0]} | max batch "
              f"{gpus[1].split()[0]} |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m in r["memory"]:
            fx = m["fixed_bytes"]
            act1, actb = m["activations_batch1_bytes"], m[f"activations_batch{batch}_bytes"]
            lines.append(
                f"| {r['family']} | {m['dtype']} | {'cached' if m['cached'] else 'uncached'} | "
                f"{'on' if m['gradient_checkpointing'] else 'off'} | {_gib(fx['controlnet_weights_grads_adamw'])} | "
                f"{_gib(fx['controlnet_autocast_copy'])} | {_gib(fx['denoiser'])} | "
                f"{_gib(fx['vae_and_text_encoders'])} | {_gib(fx['total'])} | {_gib(act1)} | {_gib(actb)} | "
                f"{_gib(fx['total'] + act1)} | {_gib(fx['total'] + actb)} | "
                + " | ".join(str(m["largest_batch"][g]) for g in gpus) + " |")
    return "\n".join(lines)


def main(cfg) -> int:
    """`zeroconv bench --on_paper`: `cfg` is zeroconv.bench.BenchConfig."""
    families = cfg.families or DEFAULT_FAMILIES
    for name in families:
        if name not in FAMILIES:
            raise UserError(f"--families {name}: unknown; use any of {', '.join(FAMILIES)}")
    if not 0 < cfg.mfu <= 1:
        raise UserError(f"--mfu {cfg.mfu}: must be a fraction in (0, 1], e.g. 0.4")
    if cfg.resolution is not None and (cfg.resolution < 64 or cfg.resolution % 16):
        raise UserError(f"--resolution {cfg.resolution}: must be a multiple of 16 of at least 64 (latents are 1/8 "
                        "of it and Flux packs 2x2 latents)")
    batch = cfg.batch_size or 8
    if batch < 2:
        raise UserError(f"--batch_size {batch}: --on_paper needs at least 2 (activations per sample are the slope "
                        "between batch 1 and this batch)")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        results = [figures_of(name, cfg, batch) for name in families]
    finally:
        diffusers_logging.set_verbosity(verbosity)
    print()
    print(tables(results))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"on_paper": results, "gpus": GPUS}, indent=1))
    return EXIT_OK


def figures_of(name: str, cfg, batch: int) -> dict:
    resolution = cfg.resolution or FAMILIES[name].resolution
    print(f"{name}: building on meta at {resolution} px, batch 1 and {batch}", flush=True)
    result = family_figures(name, resolution, batch, cfg.mfu)
    print(f"{name}: done in {result['seconds']:.0f} s", flush=True)
    return result


__all__ = ["FAMILIES", "GPUS", "main", "family_figures", "recipe_memory", "largest_batch", "SavedTensorMeter",
           "measure_step", "encoder_flops", "build_models", "TrainingStep", "FlashAttentionOnMeta"]
