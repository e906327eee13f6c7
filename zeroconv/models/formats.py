"""Key layouts: diffusers <-> the original Stable Diffusion / ControlNet layout (lllyasviel, A1111, ComfyUI).

diffusers reads the original layout (`from_single_file`, `convert_controlnet_checkpoint`, `convert_ldm_*`) but
nothing public writes it back. Here each diffusers key is mapped to its original key by the block arithmetic of
the original UNet (`input_blocks.N`: N = 1 + level * (layers_per_block + 1) + layer, with the downsampler last
in each level). Tensors are never copied, only renamed, except the few the original stores in another shape
(VAE attention as 1x1 convs, OpenCLIP's fused q/k/v).

The reverse (original -> diffusers) for a ControlNet is the exact inverse by construction: the forward map is
applied to every key of an empty model built from the config and the table is inverted, so a round trip is
bit-identical and any unexpected key is reported instead of silently dropped. Full SD checkpoints are read with
diffusers' own converters (zeroconv.models.single_file).
"""

from __future__ import annotations

import re

import torch

CONTROL_PREFIX = "control_model."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x: Hugging Face CLIP keys under a prefix
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP keys
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL's CLIP-L, Hugging Face keys
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG, its own keys

RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
EMBEDDING_PARTS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                   "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                   "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
                   "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


class UnknownKeyError(ValueError):
    """A key that this layout does not know: a model kind zeroconv does not convert (or a bug)."""


def _split(key: str, pattern: str):
    match = re.fullmatch(pattern + r"\.(.+)", key)
    return match.groups() if match else None


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET_PARTS.get(head, head)}.{tail}"


def _layers_per_block(config: dict) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise UnknownKeyError(f"layers_per_block={layers!r}: the original layout has one count for all levels")
    return layers


def unet_key_to_original(key: str, config: dict) -> str:
    """One diffusers UNet2DConditionModel (or ControlNet encoder) key -> its original key."""
    per_level = _layers_per_block(config) + 1
    for diffusers_name, original_name in EMBEDDING_PARTS.items():
        if key.startswith(diffusers_name + "."):
            return original_name + key[len(diffusers_name):]
    if parts := _split(key, r"down_blocks\.(\d+)\.resnets\.(\d+)"):
        level, layer, rest = int(parts[0]), int(parts[1]), parts[2]
        return f"input_blocks.{1 + level * per_level + layer}.0.{_resnet(rest)}"
    if parts := _split(key, r"down_blocks\.(\d+)\.attentions\.(\d+)"):
        level, layer, rest = int(parts[0]), int(parts[1]), parts[2]
        return f"input_blocks.{1 + level * per_level + layer}.1.{rest}"
    if parts := _split(key, r"down_blocks\.(\d+)\.downsamplers\.0\.conv"):
        return f"input_blocks.{(int(parts[0]) + 1) * per_level}.0.op.{parts[1]}"
    if parts := _split(key, r"mid_block\.resnets\.(\d+)"):
        return f"middle_block.{2 * int(parts[0])}.{_resnet(parts[1])}"
    if parts := _split(key, r"mid_block\.attentions\.0"):
        return f"middle_block.1.{parts[0]}"
    if parts := _split(key, r"up_blocks\.(\d+)\.resnets\.(\d+)"):
        level, layer, rest = int(parts[0]), int(parts[1]), parts[2]
        return f"output_blocks.{level * per_level + layer}.0.{_resnet(rest)}"
    if parts := _split(key, r"up_blocks\.(\d+)\.attentions\.(\d+)"):
        level, layer, rest = int(parts[0]), int(parts[1]), parts[2]
        return f"output_blocks.{level * per_level + layer}.1.{rest}"
    if parts := _split(key, r"up_blocks\.(\d+)\.upsamplers\.0\.conv"):
        level = int(parts[0])
        # The upsampler follows the last layer's resnet, and its attention when the level has one.
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
        return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{parts[1]}"
    raise UnknownKeyError(f"no original-layout name for UNet key {key!r}")


def controlnet_key_to_original(key: str, config: dict) -> str:
    """One diffusers ControlNetModel key -> its original key (without the `control_model.` prefix)."""
    if parts := _split(key, r"controlnet_down_blocks\.(\d+)"):
        return f"zero_convs.{parts[0]}.0.{parts[1]}"
    if parts := _split(key, r"controlnet_mid_block"):
        return f"middle_block_out.0.{parts[0]}"
    # input_hint_block is one Sequential with a SiLU after every conv: convs sit at the even indices.
    if parts := _split(key, r"controlnet_cond_embedding\.conv_in"):
        return f"input_hint_block.0.{parts[0]}"
    if parts := _split(key, r"controlnet_cond_embedding\.blocks\.(\d+)"):
        return f"input_hint_block.{2 * int(parts[0]) + 2}.{parts[1]}"
    if parts := _split(key, r"controlnet_cond_embedding\.conv_out"):
        blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
        return f"input_hint_block.{2 * blocks + 2}.{parts[0]}"
    return unet_key_to_original(key, config)


def controlnet_to_original(state_dict: dict, config: dict, prefix: str = "") -> dict:
    """A diffusers ControlNet state dict -> the original layout (same tensor objects, new names)."""
    return {prefix + controlnet_key_to_original(key, config): value for key, value in state_dict.items()}


def empty_controlnet(config: dict):
    """A ControlNetModel with this config and no storage: its key list and shapes, instantly."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        return ControlNetModel.from_config(config)


def controlnet_from_original(state_dict: dict, config: dict, prefix: str = "") -> dict:
    """An original-layout ControlNet state dict -> diffusers keys; the exact inverse of controlnet_to_original."""
    expected = empty_controlnet(config).state_dict()
    return _checked(state_dict, expected, {prefix + controlnet_key_to_original(key, config): key for key in expected})


def controlnet_from_diffusers_keys(state_dict: dict, config: dict) -> dict:
    """A ControlNet state dict already in diffusers' names, checked against its config as the original one is."""
    expected = empty_controlnet(config).state_dict()
    return _checked(state_dict, expected, {key: key for key in expected})


def _checked(state_dict: dict, expected: dict, names: dict) -> dict:
    """`state_dict` renamed by `names` (file key -> diffusers key); every key and shape must match `expected`."""
    missing = sorted(set(names) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(names))
    if missing or unexpected:
        raise UnknownKeyError(f"the ControlNet does not match its config: {len(missing)} missing keys "
                              f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    converted = {names[key]: value for key, value in state_dict.items()}
    wrong = [key for key, value in converted.items() if value.shape != expected[key].shape]
    if wrong:
        raise UnknownKeyError(f"the ControlNet does not match its config: shape of {wrong[0]} is "
                              f"{tuple(converted[wrong[0]].shape)}, config says {tuple(expected[wrong[0]].shape)}")
    return converted


def unet_to_original(state_dict: dict, config: dict, prefix: str = UNET_PREFIX) -> dict:
    return {prefix + unet_key_to_original(key, config): value for key, value in state_dict.items()}


def vae_key_to_original(key: str, num_levels: int) -> str:
    key = key.replace("conv_norm_out.", "norm_out.")
    if parts := _split(key, r"(encoder|decoder)\.mid_block\.resnets\.(\d+)"):
        return f"{parts[0]}.mid.block_{int(parts[1]) + 1}.{parts[2]}".replace("conv_shortcut", "nin_shortcut")
    if parts := _split(key, r"(encoder|decoder)\.mid_block\.attentions\.0"):
        renames = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        head, _, tail = parts[1].rpartition(".")
        return f"{parts[0]}.mid.attn_1.{renames.get(head, head)}.{tail}"
    if parts := _split(key, r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)"):
        return f"encoder.down.{parts[0]}.block.{parts[1]}.{parts[2]}".replace("conv_shortcut", "nin_shortcut")
    if parts := _split(key, r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv"):
        return f"encoder.down.{parts[0]}.downsample.conv.{parts[1]}"
    # The decoder's up blocks are numbered from the latent side in diffusers and from the image side originally.
    if parts := _split(key, r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)"):
        level = num_levels - 1 - int(parts[0])
        return f"decoder.up.{level}.block.{parts[1]}.{parts[2]}".replace("conv_shortcut", "nin_shortcut")
    if parts := _split(key, r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv"):
        return f"decoder.up.{num_levels - 1 - int(parts[0])}.upsample.conv.{parts[1]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
        return key
    raise UnknownKeyError(f"no original-layout name for VAE key {key!r}")


def vae_to_original(state_dict: dict, config: dict, prefix: str = VAE_PREFIX) -> dict:
    num_levels = len(config["block_out_channels"])
    out = {}
    for key, value in state_dict.items():
        name = vae_key_to_original(key, num_levels)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original's attention projections are 1x1 convs
        out[prefix + name] = value
    return out


def clip_to_original(state_dict: dict, prefix: str = CLIP_PREFIX) -> dict:
    """SD 1.x text encoder: Hugging Face CLIP keys (transformers >= 5.6 drops their `text_model.` level)."""
    return {prefix + key.removeprefix("text_model."): value for key, value in state_dict.items()
            if not key.endswith("position_ids")}


def open_clip_to_original(state_dict: dict, prefix: str = OPEN_CLIP_PREFIX) -> dict:
    """SD 2.x text encoder: Hugging Face CLIP keys -> OpenCLIP's (fused q/k/v as in_proj)."""
    renames = [("embeddings.token_embedding.weight", "token_embedding.weight"),
               ("embeddings.position_embedding.weight", "positional_embedding"),
               ("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks."),
               (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
               (".mlp.fc2.", ".mlp.c_proj."), (".self_attn.out_proj.", ".attn.out_proj.")]
    out, fused = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":  # a Linear in transformers, a [width, projection] matrix in OpenCLIP
            out[prefix + "text_projection"] = value.T
            continue
        if parts := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((int(parts[1]), parts[3]), {})[parts[2]] = value
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[prefix + key] = value
    for (layer, kind), qkv in fused.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def sd_to_original(unet, vae, text_encoder) -> dict:
    """A diffusers SD 1.x/2.x model as one original-layout state dict (what A1111 and ComfyUI load).

    SD 2.x (linear attention projections) gets its text encoder in OpenCLIP's layout, SD 1.x in CLIP's."""
    sd2 = bool(unet.config.use_linear_projection)
    text = open_clip_to_original if sd2 else clip_to_original
    return {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config),
            **text(text_encoder.state_dict())}


def sdxl_to_original(unet, vae, text_encoder, text_encoder_2) -> dict:
    """A diffusers SDXL model as one original-layout state dict (Stability's sd_xl_base_1.0.safetensors layout):
    the text encoders under conditioner.embedders.0 (CLIP-L) and .1 (OpenCLIP bigG, with its projection)."""
    return {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config),
            **clip_to_original(text_encoder.state_dict(), SDXL_CLIP_PREFIX),
            **open_clip_to_original(text_encoder_2.state_dict(), SDXL_OPEN_CLIP_PREFIX)}


def detect_control_prefix(keys) -> str:
    """'control_model.' when the ControlNet keys carry it (lllyasviel's files), '' when they do not."""
    keys = list(keys)
    if any(key.startswith(CONTROL_PREFIX + "input_hint_block.") for key in keys):
        return CONTROL_PREFIX
    if any(key.startswith("input_hint_block.") for key in keys):
        return ""
    raise UnknownKeyError("no input_hint_block keys: not an original-layout ControlNet")


def _shapes(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix):]: tuple(value.shape) for key, value in state_dict.items() if key.startswith(prefix)}


def infer_encoder_config(shapes: dict) -> dict:
    """The UNet-encoder part of a diffusers config from original-layout key shapes (UNet or ControlNet).

    The head count is not in the weights: SD 1.x's 8 heads, or 64 channels per head for linear-projection
    (SD 2.x, SDXL) models, as in their original configs."""
    levels = 1 + len({k.split(".")[1] for k in shapes if re.match(r"input_blocks\.\d+\.0\.op\.weight$", k)})
    num_inputs = len({k.split(".")[1] for k in shapes if k.startswith("input_blocks.")})
    per_level = num_inputs // levels  # input_blocks.0 (conv_in) stands in for the downsampler the last level lacks
    first = [1 + i * per_level for i in range(levels)]
    channels = [shapes[f"input_blocks.{n}.0.out_layers.3.weight"][0] for n in first]
    attention = [f"input_blocks.{n}.1.proj_in.weight" in shapes for n in first]
    first_attention = next((f"input_blocks.{n}.1" for n, a in zip(first, attention) if a), None)
    linear = first_attention is not None and len(shapes[first_attention + ".proj_in.weight"]) == 2
    cross_dim = shapes[first_attention + ".transformer_blocks.0.attn2.to_k.weight"][1] if first_attention else None
    depth = [len({k.split(".")[4] for k in shapes if k.startswith(f"input_blocks.{n}.1.transformer_blocks.")})
             for n in first]
    config = {
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "layers_per_block": per_level - 1,
        "cross_attention_dim": cross_dim,
        "use_linear_projection": linear,
        "attention_head_dim": [max(1, c // 64) for c in channels] if linear else 8,
        "transformer_layers_per_block": max(depth) if len({d for d in depth if d}) <= 1 else [max(d, 1) for d in depth],
    }
    if "label_emb.0.0.weight" in shapes:  # SDXL's add_embedding
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1])
    return config


def infer_controlnet_config(state_dict: dict, prefix: str = "") -> dict:
    """A diffusers ControlNet config from an original-layout state dict's shapes (for files without metadata)."""
    shapes = _shapes(state_dict, prefix)
    hint = sorted(int(k.split(".")[1]) for k in shapes if re.match(r"input_hint_block\.\d+\.weight$", k))
    hint_widths = [shapes[f"input_hint_block.{i}.weight"][0] for i in hint[:-1]]
    return {
        **infer_encoder_config(shapes),
        "conditioning_channels": shapes["input_hint_block.0.weight"][1],
        # blocks alternate (c_i -> c_i) and (c_i -> c_i+1, stride 2): every other conv's width is the encoder's.
        "conditioning_embedding_out_channels": hint_widths[0::2],
    }


def infer_unet_config(state_dict: dict, prefix: str = UNET_PREFIX) -> dict:
    """A diffusers UNet2DConditionModel config from an original-layout SD checkpoint's shapes."""
    shapes = _shapes(state_dict, prefix)
    config = infer_encoder_config(shapes)
    config["out_channels"] = shapes["out.2.weight"][0]
    config["up_block_types"] = [kind.replace("Down", "Up") for kind in reversed(config["down_block_types"])]
    return config


def infer_vae_config(state_dict: dict, prefix: str = VAE_PREFIX) -> dict:
    shapes = _shapes(state_dict, prefix)
    levels = len({k.split(".")[2] for k in shapes if k.startswith("encoder.down.")})
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")}),
        "latent_channels": shapes["decoder.conv_in.weight"][1],
    }
