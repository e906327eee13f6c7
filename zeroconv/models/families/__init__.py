"""Model families: what differs between SD 1.x/2.x, SDXL, SD3 and Flux, behind one interface.

A family is a class with the methods of `Family` below, in its own module, registered in FAMILIES. Everything
above zeroconv.models (training, the cache, validation, sampling) calls the family of the loaded base
(`Base.family`) and never asks which one it is. `detect` finds the family of a base from its model_index.json
`_class_name`, its unet/config.json, or the keys of a single-file checkpoint; docs/architecture.md has the recipe
for adding one.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from zeroconv.errors import UserError

if TYPE_CHECKING:
    import torch

    from zeroconv.models.draws import Generators
    from zeroconv.models.noise import NoiseRecipe
    from zeroconv.models.parts import Base

# name -> "module:class". One line a family; the order is the order detection asks them in.
FAMILIES: dict[str, str] = {
    "sd": "zeroconv.models.families.sd:StableDiffusion",
    "sdxl": "zeroconv.models.families.sdxl:StableDiffusionXL",
    "sd3": "zeroconv.models.families.sd3:StableDiffusion3",
    "flux": "zeroconv.models.families.flux:Flux",
}


class Family(Protocol):
    name: str
    label: str  # for messages: "Stable Diffusion 1.x/2.x"
    pipeline_classes: tuple[str, ...]  # model_index.json _class_name values it loads
    decoder_prefixes: tuple[str, ...]  # the denoiser's parameters --sd_locked false trains
    writes_combined_file: bool  # whether `init --combined` can write base + ControlNet in one original file

    def matches_unet_config(self, config: dict) -> bool: ...  # the denoiser's: unet/ or transformer/config.json
    def matches_keys(self, keys: set[str]) -> bool: ...
    def load_base(self, location: str, name: str, revision: str | None, variant: str | None,
                  cache_dir: str | None, tokenizer_name: str | None, dtype,
                  defer_text_encoders: bool = False) -> Base: ...  # deferred: models.parts.Deferred
    def load_denoiser(self, location: str, name: str, revision: str | None = None, tokenizer_name: str | None = None,
                      prediction_type: str | None = None) -> Base: ...  # no text encoders: for `zeroconv init`
    def frozen_encoders(self, base: Base) -> list: ...
    def vae_dtype(self, base: Base, dtype: torch.dtype) -> torch.dtype: ...
    def prompt_shape(self, base: Base) -> dict[str, tuple[int, ...]]: ...
    # num_layers: a transformer family's ControlNet depth (--num_layers); extra channels: SD3's mask input
    def build_controlnet(self, base: Base, conditioning_channels: int, condition_encoder_init: str | None,
                         num_layers: int | None = None, num_extra_conditioning_channels: int = 0,
                         num_double_layers: int = 4, num_single_layers: int = 10): ...  # depths: SD3's, Flux's
    # a union ControlNet of num_control_types condition types (SDXL's ControlNetUnionModel, Flux's num_mode);
    # several_per_sample: whether a sample may be given several types (not Flux); UserError for SD and SD3
    def build_union_controlnet(self, base: Base, num_control_types: int, conditioning_channels: int = 3,
                               condition_encoder_init: str | None = None, several_per_sample: bool = False,
                               num_double_layers: int = 4, num_single_layers: int = 10): ...
    def load_controlnet(self, path: str, cache_dir: str | None = None, dtype=None): ...
    # the ControlNet's parts that run on the condition's pixel grid, not the latent one (SD: its condition encoder;
    # none where the condition enters as latents: SD3, Flux); the channels_last rule judges them by that grid
    def pixel_grid_modules(self, controlnet) -> list: ...
    # what the denoiser reads of a caption, by name (SD: prompt_embeds); the latent cache stores it per caption
    def encode_prompts(self, base: Base, captions: list[str], device) -> dict[str, torch.Tensor]: ...
    # the ControlNet's input from the condition's [0, 1] pixels (SD: the pixels; SD3: their VAE latents)
    # a union ControlNet's: condition [B, K, C, H, W] with control_types=[B, K] bool, the types each sample has
    def encode_condition(self, base: Base, condition: torch.Tensor, generator: Generators,
                         control_types: torch.Tensor | None = None) -> torch.Tensor: ...
    def noisy_batch(self, scheduler, latents: torch.Tensor, generator: Generators, recipe: NoiseRecipe | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]: ...
    def predicted_clean(self, scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, pred: torch.Tensor
                        ) -> torch.Tensor: ...
    def decode_latents(self, base: Base, latents: torch.Tensor) -> torch.Tensor: ...
    # micro: per sample (original h, w, crop top, left, target h, w), float32 [N, 6]; SDXL's add_time_ids
    def denoise(self, unet, controlnet, noisy, timesteps, prompts: dict[str, torch.Tensor], condition,
                micro: torch.Tensor, only_mid_control: bool = False,
                guidance: float | None = None) -> torch.Tensor: ...  # guidance: Flux's embedding value
    # a union ControlNet's call takes control_types=[B, K] bool too (the same as encode_condition's)
    def pipeline(self, base: Base, controlnet=None, *, unet=None, scheduler: str = "unipc"): ...
    def controlnet_to_original(self, state_dict: dict, config: dict, prefix: str = "") -> dict: ...


def get_family(name: str) -> Family:
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def families() -> list[Family]:
    return [get_family(name) for name in FAMILIES]


def single_file_keys(path: Path) -> set[str]:
    """The tensor names of a single-file checkpoint; from the header alone for .safetensors."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                return set(handle.keys())
        except SafetensorError as exc:
            raise UserError(f"{path}: cannot read it as a checkpoint ({str(exc).splitlines()[0]})") from None
    from zeroconv.models.single_file import read_checkpoint

    return set(read_checkpoint(path)[0])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def hub_model_index(name: str, revision: str | None, cache_dir: str | None) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        return _read_json(Path(hf_hub_download(name, "model_index.json", revision=revision, cache_dir=cache_dir)))
    except Exception:  # noqa: BLE001 - the load that follows names the real problem (missing repo, network)
        return {}


def detect(location: str, name: str | None = None, revision: str | None = None, cache_dir: str | None = None,
           flag: str = "--pretrained_model_name_or_path") -> Family:
    """The family of the base at `location` (a resolved folder, file or hub id; `name` is what the user gave)."""
    name = name or location
    path = Path(location)
    if path.is_file():
        keys = single_file_keys(path)
        for family in families():
            if family.matches_keys(keys):
                return family
        sample = ", ".join(sorted({key.split(".")[0] for key in keys})[:8])
        raise UserError(f"{flag} {name}: its keys (top-level names {sample}) match no model family zeroconv trains "
                        f"({', '.join(f.label for f in families())}); pass an original-layout SD 1.x/2.x or SDXL checkpoint")
    index = _read_json(path / "model_index.json") if path.is_dir() else hub_model_index(location, revision, cache_dir)
    class_name = index.get("_class_name")
    if class_name:
        for family in families():
            if class_name in family.pipeline_classes:
                return family
        known = ", ".join(c for f in families() for c in f.pipeline_classes)
        raise UserError(f"{flag} {name}: model_index.json names {class_name}, which no zeroconv model family "
                        f"trains (known: {known}); use a base of one of those pipelines")
    # the denoiser's config: a UNet's (SD, SDXL) or a transformer's (SD3)
    unet = next((config for folder in ("unet", "transformer") if path.is_dir()
                 for config in [_read_json(path / folder / "config.json")] if config), {})
    for family in families():
        if unet and family.matches_unet_config(unet):
            return family
    found = unet.get("_class_name") if unet else "no model_index.json and no unet/ or transformer/config.json"
    raise UserError(f"{flag} {name}: cannot tell the model family ({found}); expected a diffusers folder of one of "
                    f"{', '.join(f.label for f in families())} (save one with its pipeline's save_pretrained)")
