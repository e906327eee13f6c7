"""`zeroconv init`: lllyasviel's tool_add_control in one command.

From a base SD 1.x/2.x model (diffusers folder, hub id, 'toy', or one .ckpt/.safetensors file) write the
initial ControlNet: the base UNet's encoder copied, the condition encoder freshly initialised (seeded), every
zero convolution zero. Optionally also the combined file lllyasviel's training starts from: the whole base in
the original layout plus the ControlNet under `control_model.`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from zeroconv.config import CONDITION_ENCODER_INITS, option, parse
from zeroconv.errors import UserError


@dataclass
class InitConfig:
    base: str | None = option(None, "Base SD 1.x/2.x model: a diffusers folder, a hub id, a single .ckpt/.safetensors "
                              "file, or 'toy'. Required.")
    out: str | None = option(None, "Folder to write the initial ControlNet to (diffusers layout). Required.")
    combined: str | None = option(
        None, "Also write the base plus the ControlNet as one original-layout .safetensors (control_model.* keys), "
        "like tool_add_control.py's output.")
    conditioning_channels: int = option(3, "Channels of the conditioning image: 1, 3 or 4.", choices=[1, 3, 4])
    condition_encoder_init: str = option(
        "paper", "Initial weights of the condition encoder: 'paper' (PyTorch default, as diffusers) or "
        "'unit_variance' (He-normal; see `zeroconv train --help`).", choices=list(CONDITION_ENCODER_INITS))
    seed: int = option(0, "Seed of the condition encoder's initial weights (everything else is copied or zero).")
    revision: str | None = option(None, "Revision of a hub base.")
    prediction_type: str | None = option(
        None, "Prediction type of a single-file base, recorded in the combined file (default: from the file's "
        "metadata or .yaml; SD 1.x epsilon, SD 2.x v_prediction).", choices=["epsilon", "v_prediction"])


def base_unet_and_scale(base: str, revision: str | None = None, prediction_type: str | None = None):
    """(base UNet, VAE scale factor, original-layout base or None) without loading more than needed."""
    from zeroconv.models.base import check_base_arg, resolve_base

    check_base_arg(base, flag="--base", revision=revision)
    path = resolve_base(base)
    if Path(path).is_file():
        from zeroconv.models.single_file import read_checkpoint, sd_components, vae_scale_factor_of

        checkpoint, metadata = read_checkpoint(path)
        unet = sd_components(checkpoint, metadata, Path(path), prediction_type, components=("unet",))["unet"]
        return unet, vae_scale_factor_of(checkpoint), (checkpoint, metadata)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision)
    vae_config = AutoencoderKL.load_config(path, subfolder="vae", revision=revision)
    return unet, 2 ** (len(vae_config["block_out_channels"]) - 1), None


def initial_controlnet(unet, vae_scale_factor: int, conditioning_channels: int = 3, seed: int = 0,
                       condition_encoder_init: str = "paper"):
    from zeroconv.models.controlnet import build_controlnet

    torch.manual_seed(seed)
    return build_controlnet(unet, vae_scale_factor, conditioning_channels=conditioning_channels,
                            condition_encoder_init=condition_encoder_init)


def main(argv: list[str]) -> int:
    config = parse(InitConfig, argv, prog="zeroconv init", description=__doc__)
    if not config.out:
        raise UserError("--out is required: the folder to write the initial ControlNet to")
    if config.combined and Path(config.combined).suffix != ".safetensors":
        raise UserError(f"--combined {config.combined}: the combined file is written as .safetensors; change the suffix")
    unet, scale, original = base_unet_and_scale(config.base, config.revision, config.prediction_type)
    controlnet = initial_controlnet(unet, scale, config.conditioning_channels, config.seed,
                                    config.condition_encoder_init)
    out = Path(config.out)
    controlnet.save_pretrained(out)
    print(f"initial ControlNet ({sum(p.numel() for p in controlnet.parameters()) / 1e6:.1f}M parameters) -> {out}")
    if config.combined:
        from zeroconv.models.single_file import save_combined

        path = save_combined(config.combined, controlnet.state_dict(), controlnet.config, config.base,
                             original=original, revision=config.revision, prediction_type=config.prediction_type)
        print(f"base + ControlNet, original layout -> {path}")
    return 0
