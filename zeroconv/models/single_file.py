"""One-file Stable Diffusion checkpoints (.ckpt/.safetensors in the original layout), read and written offline.

diffusers' `from_single_file` fetches each component's config from the hub; offline it fails. The weights
themselves say almost everything the configs need (widths, depths, attention kinds), so the configs are built
from the checkpoint's shapes (zeroconv.models.formats.infer_*) and the tensors are converted with diffusers'
own converters. Files that zeroconv writes carry the exact diffusers configs in their safetensors metadata,
which then take precedence over the inferred ones (the head count, for one, is not in the weights).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from zeroconv.errors import UserError
from zeroconv.models import formats

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CONFIG_METADATA = {"unet": "zeroconv.unet_config", "vae": "zeroconv.vae_config",
                   "text_encoder": "zeroconv.text_encoder_config", "controlnet": "zeroconv.controlnet_config"}
# Where diffusers itself looks for the tokenizers SD checkpoints were trained with.
DEFAULT_TOKENIZERS = {"clip": ("openai/clip-vit-large-patch14", None),
                      "open_clip": ("stabilityai/stable-diffusion-2", "tokenizer")}


DATA_ALIGNMENT = 64  # bytes; what the CPU's vector kernels want of the tensors they read
ALIGNMENT_KEY = "zeroconv.align"


def save_aligned(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    """safetensors' save_file, with the data section starting on a 64-byte boundary.

    safetensors aligns it to 8 bytes only. A memory-mapped load (diffusers' from_single_file, safe_open) hands
    the kernels tensors at those offsets, and on CPU the vectorised code then sums in another order: the same
    weights give outputs that differ in the last bit from a copy in RAM (or from a diffusers folder, whose short
    header happens to land on 32). A padding entry in the metadata moves the data to the boundary; its length
    comes from the header safetensors will write (tensors by dtype size, then name; compact JSON)."""
    from safetensors.torch import _TYPES, save_file

    names = {dtype: name for name, dtype in _TYPES.items()}
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    metadata = {key: value for key, value in (metadata or {}).items() if key != ALIGNMENT_KEY}
    entries, offset = {}, 0
    for key in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        size = tensors[key].numel() * tensors[key].element_size()
        entries[key] = {"dtype": names[tensors[key].dtype], "shape": list(tensors[key].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {**metadata, ALIGNMENT_KEY: ""}, **entries}, separators=(",", ":"),
                        ensure_ascii=False).encode()
    # 8 bytes of length, then the header padded to 8: aim the header's end at 56 mod 64 so no padding follows
    pad = (DATA_ALIGNMENT - 8 - len(header)) % DATA_ALIGNMENT
    save_file(tensors, str(path), metadata={**metadata, ALIGNMENT_KEY: " " * pad})
    return Path(path)


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of a .ckpt/.safetensors file; a nested 'state_dict' is unwrapped."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        state_dict = load_single_file_checkpoint(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as a checkpoint ({str(exc).splitlines()[0]})") from None
    metadata = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    return state_dict, metadata


def text_encoder_kind(state_dict: dict) -> str:
    if any(key.startswith(formats.CLIP_PREFIX) for key in state_dict):
        return "clip"
    if any(key.startswith(formats.OPEN_CLIP_PREFIX) for key in state_dict):
        return "open_clip"
    if any(key.startswith("conditioner.embedders.") for key in state_dict):
        raise UserError("an SDXL checkpoint: it loads as an SDXL base (zeroconv.models.base.load_base), not with "
                        "the SD 1.x/2.x reader")
    raise UserError("no text encoder (cond_stage_model.*) in the checkpoint: not a full SD 1.x/2.x checkpoint")


def resolve_prediction_type(path: Path, metadata: dict, kind: str, prediction_type: str | None) -> str:
    """Given > the file's ModelSpec metadata > a .yaml config beside the file > SD 1.x: epsilon, SD 2.x: v."""
    if prediction_type:
        return prediction_type
    stated = metadata.get("modelspec.prediction_type")
    if stated:
        return "v_prediction" if stated in ("v", "v_prediction") else "epsilon"
    original_config = path.with_suffix(".yaml")
    if original_config.is_file():
        import yaml

        params = (yaml.safe_load(original_config.read_text()) or {}).get("model", {}).get("params", {})
        return "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    if kind == "clip":
        return "epsilon"
    logger.warning("%s: SD 2.x checkpoint without a .yaml or metadata; assuming v_prediction (the 768 models). "
                   "Pass prediction_type='epsilon' for a 2.x-base model.", path.name)
    return "v_prediction"


def sd_scheduler_config(prediction_type: str) -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def text_encoder_config(state_dict: dict, kind: str) -> dict:
    """CLIPTextConfig values from the checkpoint's shapes; 64 channels per head as in CLIP and OpenCLIP."""
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    if kind == "clip":
        prefix = formats.CLIP_PREFIX
        token, position = "embeddings.token_embedding.weight", "embeddings.position_embedding.weight"
        layer_prefix, fc1 = "encoder.layers.", "encoder.layers.0.mlp.fc1.weight"
    else:
        prefix = formats.OPEN_CLIP_PREFIX
        token, position = "token_embedding.weight", "positional_embedding"
        layer_prefix, fc1 = "transformer.resblocks.", "transformer.resblocks.0.mlp.c_fc.weight"
    # SD 2.x conditions on OpenCLIP's penultimate layer; diffusers drops the last one (as its converter does).
    ignored = set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    layers = {key[len(prefix + layer_prefix):].split(".")[0] for key in state_dict
              if key.startswith(prefix + layer_prefix) and key not in ignored}
    vocab, hidden = state_dict[prefix + token].shape
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=state_dict[prefix + fc1].shape[0],
                num_hidden_layers=len(layers), num_attention_heads=max(1, hidden // 64),
                max_position_embeddings=state_dict[prefix + position].shape[0],
                hidden_act="quick_gelu" if kind == "clip" else "gelu", projection_dim=hidden)


def _config(metadata: dict, component: str, inferred) -> dict:
    stated = metadata.get(CONFIG_METADATA[component])
    return json.loads(stated) if stated else inferred()


def _filled(model_class, state_dict: dict, config, dtype=None):
    """A model built without storage, then given the converted tensors (no second copy in memory), converted to
    `dtype` here: a `.to(dtype)` of the built model would make diffusers warn (zeroconv.models.pipeline)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    model.load_state_dict(_cast(state_dict, dtype), strict=True, assign=True)
    return model.eval()


def load_sd_single_file(path: str | Path, prediction_type: str | None = None, components=COMPONENTS,
                        tokenizer_name: str | None = None, dtype=None) -> dict:
    """The parts of an original-layout SD 1.x/2.x checkpoint as diffusers/transformers objects, offline.

    Returns {component: object} for the requested `components` (all by default): unet, vae, text_encoder,
    tokenizer, scheduler. The tokenizer is not in the file: `tokenizer_name` (a folder or hub id), else the one
    the checkpoint's family was trained with, from the local hub cache when offline. With `dtype`, the floating
    point weights are converted to it as they are loaded (otherwise they keep the file's dtype)."""
    path = Path(path)
    return sd_components(*read_checkpoint(path), path=path, prediction_type=prediction_type,
                         components=components, tokenizer_name=tokenizer_name, dtype=dtype)


def sd_components(checkpoint: dict, metadata: dict, path: Path, prediction_type: str | None = None,
                  components=COMPONENTS, tokenizer_name: str | None = None, dtype=None) -> dict:
    """load_sd_single_file on a checkpoint already read (by read_checkpoint)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as ldm

    if not any(key.startswith(formats.UNET_PREFIX) for key in checkpoint):
        raise UserError(f"{path}: no model.diffusion_model.* keys; expected a full SD 1.x/2.x checkpoint")
    kind = text_encoder_kind(checkpoint)
    prediction_type = resolve_prediction_type(path, metadata, kind, prediction_type)
    sample_size = 96 if kind == "open_clip" and prediction_type == "v_prediction" else 64
    parts = {}
    if "unet" in components:
        config = _config(metadata, "unet", lambda: {**formats.infer_unet_config(checkpoint),
                                                     "sample_size": sample_size})
        parts["unet"] = _filled(UNet2DConditionModel, ldm.convert_ldm_unet_checkpoint(checkpoint, config), config,
                                dtype)
    if "vae" in components:
        config = _config(metadata, "vae", lambda: {**formats.infer_vae_config(checkpoint),
                                                    "scaling_factor": ldm.LDM_VAE_DEFAULT_SCALING_FACTOR})
        parts["vae"] = _filled(AutoencoderKL, ldm.convert_ldm_vae_checkpoint(checkpoint, config), config, dtype)
    if "text_encoder" in components:
        from accelerate import init_empty_weights
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(**_config(metadata, "text_encoder", lambda: text_encoder_config(checkpoint, kind)))
        with init_empty_weights():
            shell = CLIPTextModel(config)
        if kind == "clip":
            converted = ldm.convert_ldm_clip_checkpoint(checkpoint)
        else:
            converted = ldm.convert_open_clip_checkpoint(shell, checkpoint, prefix=formats.OPEN_CLIP_PREFIX)
        if not hasattr(shell, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
        converted = {key: value for key, value in converted.items() if not key.endswith("position_ids")}
        parts["text_encoder"] = _filled(CLIPTextModel, converted, config, dtype)
    if "tokenizer" in components:
        parts["tokenizer"] = load_tokenizer(tokenizer_name, kind, path)
    if "scheduler" in components:
        parts["scheduler"] = PNDMScheduler(**sd_scheduler_config(prediction_type))
    return parts


def load_tokenizer(name: str | None, kind: str, checkpoint_path: Path):
    from transformers import CLIPTokenizer

    from zeroconv.hub import hub_offline

    repo, subfolder = (name, None) if name else DEFAULT_TOKENIZERS[kind]
    if name and Path(name).is_dir() and (Path(name) / "tokenizer").is_dir():
        repo, subfolder = name, "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(repo, subfolder=subfolder, local_files_only=hub_offline())
    except (OSError, ValueError):
        raise UserError(f"{checkpoint_path.name}: the tokenizer is not inside single-file checkpoints and {repo} "
                        "is not available (offline and not cached); pass --tokenizer_name a local CLIP tokenizer "
                        "folder") from None


def vae_scale_factor_of(checkpoint: dict) -> int:
    """The VAE's downsampling factor from its keys alone (no VAE needs building to size a ControlNet)."""
    levels = len({key.split(".")[3] for key in checkpoint if key.startswith(formats.VAE_PREFIX + "encoder.down.")})
    return 2 ** (levels - 1)


def config_json(config) -> str:
    """A diffusers config as JSON, without its bookkeeping keys (_name_or_path may be a Path)."""
    return json.dumps({key: value for key, value in dict(config).items() if not key.startswith("_")})


def sd_metadata(unet, vae, text_encoder, prediction_type: str) -> dict:
    """safetensors metadata for a zeroconv-written SD file: exact diffusers configs, and ModelSpec's
    prediction type (what A1111 and ComfyUI read to pick epsilon or v)."""
    return {"format": "pt", "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
            CONFIG_METADATA["unet"]: config_json(unet.config),
            CONFIG_METADATA["vae"]: config_json(vae.config),
            CONFIG_METADATA["text_encoder"]: json.dumps(text_encoder.config.to_diff_dict())}


def save_sd_single_file(path: str | Path, unet, vae, text_encoder, prediction_type: str = "epsilon",
                        extra_tensors: dict | None = None, extra_metadata: dict | None = None) -> Path:
    """Write a diffusers SD model as one original-layout .safetensors (plus e.g. control_model.* tensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: single SD files are written as .safetensors; change the suffix")
    tensors = {**formats.sd_to_original(unet, vae, text_encoder), **(extra_tensors or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_aligned(tensors, path, {**sd_metadata(unet, vae, text_encoder, prediction_type),
                                        **(extra_metadata or {})})



def _cast(tensors: dict, dtype: torch.dtype | None) -> dict:
    """Floating tensors to `dtype` (None: unchanged), all contiguous for safetensors."""
    return {key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous()
            for key, value in tensors.items()}


def save_combined(path: str | Path, control_state_dict: dict, control_config: dict, base: str, unet=None,
                  original: tuple[dict, dict] | None = None, revision: str | None = None,
                  prediction_type: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """The base SD model and a ControlNet (as `control_model.*`) in one original-layout .safetensors, the layout
    of lllyasviel's tool_add_control output and 1.0 releases. `unet` (diffusers) replaces the base's own, for a
    run that trained the decoder. A single-file base keeps every tensor it had; `original` is it, already read."""
    from safetensors.torch import save_file

    from zeroconv.models.locate import resolve_base

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: the combined SD + ControlNet file is written as .safetensors; change the suffix")
    control = formats.controlnet_to_original(control_state_dict, control_config, prefix=formats.CONTROL_PREFIX)
    control_metadata = {CONFIG_METADATA["controlnet"]: config_json(control_config)}
    folder = resolve_base(base)
    if original is not None or Path(folder).is_file():
        checkpoint, metadata = original if original is not None else read_checkpoint(folder)
        tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
        metadata = {"format": "pt", **metadata, **control_metadata}
        if unet is not None:
            tensors = {key: value for key, value in tensors.items() if not key.startswith(formats.UNET_PREFIX)}
            tensors.update(formats.unet_to_original(unet.state_dict(), unet.config))
            metadata[CONFIG_METADATA["unet"]] = config_json(unet.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_aligned(_cast({**tensors, **control}, dtype), path, metadata)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    common = dict(revision=revision)
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **common)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **common)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **common)
    scheduler = DDPMScheduler.load_config(folder, subfolder="scheduler", **common)
    tensors = {**formats.sd_to_original(unet, vae, text_encoder), **control}
    metadata = {**sd_metadata(unet, vae, text_encoder, prediction_type or scheduler.get("prediction_type", "epsilon")),
                **control_metadata}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_aligned(_cast(tensors, dtype), path, metadata)
