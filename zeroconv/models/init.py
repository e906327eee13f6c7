"""`zeroconv init`: lllyasviel's tool_add_control in one command.

From a base model (a diffusers folder, hub id, 'toy', or one .ckpt/.safetensors file of SD 1.x/2.x or SDXL)
write the initial ControlNet, built as `zeroconv train` builds it: the base UNet's encoder copied, the condition
encoder freshly initialised (seeded), every zero convolution zero. For SD 1.x/2.x optionally also the combined
file lllyasviel's training starts from: the whole base in the original layout plus the ControlNet under
`control_model.`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from zeroconv.config import CONDITION_ENCODER_INITS, option, parse
from zeroconv.errors import UserError


@dataclass
class InitConfig:
    base: str | None = option(None, "Base model: a diffusers folder or hub id (SD 1.x/2.x, SDXL, SD3), a single "
                              ".ckpt/.safetensors file (SD 1.x/2.x, SDXL), or 'toy'. Required.")
    out: str | None = option(None, "Folder to write the initial ControlNet to (diffusers layout). Required.")
    combined: str | None = option(
        None, "Also write the base plus the ControlNet as one original-layout .safetensors (control_model.* keys), "
        "like tool_add_control.py's output (SD 1.x/2.x bases).")
    conditioning_channels: int = option(3, "Channels of the conditioning image: 1, 3 or 4.", choices=[1, 3, 4])
    condition_encoder_init: str | None = option(
        None, "Initial weights of the condition encoder, as `zeroconv train` builds it: unset is 'unit_variance' "
        "(He-normal) for SD and SDXL; 'paper' is PyTorch's default, as diffusers (see `zeroconv train --help`).",
        choices=list(CONDITION_ENCODER_INITS))
    seed: int = option(0, "Seed of the condition encoder's initial weights (everything else is copied or zero).")
    revision: str | None = option(None, "Revision of a hub base.")
    prediction_type: str | None = option(
        None, "Prediction type of a single-file base, recorded in the combined file (default: from the file's "
        "metadata or .yaml; SD 1.x epsilon, SD 2.x v_prediction).", choices=["epsilon", "v_prediction"])
    tokenizer_name: str | None = option(
        None, "For a single-file SDXL base: a diffusers SDXL folder (or hub id) whose configs describe the file, as "
        "`zeroconv train --tokenizer_name` (default: SDXL 1.0's, from the Hub or its local cache).")


def main(argv: list[str]) -> int:
    config = parse(InitConfig, argv, prog="zeroconv init", description=__doc__)
    if not config.out:
        raise UserError("--out is required: the folder to write the initial ControlNet to")
    if config.combined and Path(config.combined).suffix != ".safetensors":
        raise UserError(f"--combined {config.combined}: the combined file is written as .safetensors; change the suffix")
    from zeroconv.models.base import load_denoiser

    base = load_denoiser(config.base, config.revision, config.tokenizer_name, config.prediction_type)
    if config.combined and not base.family.writes_combined_file:
        raise UserError(f"--combined {config.combined}: the base + ControlNet file is lllyasviel's SD 1.x/2.x "
                        f"layout; a {base.family.label} ControlNet is shared on its own (`zeroconv export`): drop "
                        "the flag")
    torch.manual_seed(config.seed)  # the condition encoder's draws: everything else is copied or zero
    controlnet = base.family.build_controlnet(base, config.conditioning_channels, config.condition_encoder_init)
    out = Path(config.out)
    controlnet.save_pretrained(out)
    print(f"initial ControlNet ({sum(p.numel() for p in controlnet.parameters()) / 1e6:.1f}M parameters) -> {out}")
    if config.combined:
        from zeroconv.models.single_file import save_combined

        path = save_combined(config.combined, controlnet.state_dict(), controlnet.config, config.base,
                             revision=config.revision, prediction_type=config.prediction_type)
        print(f"base + ControlNet, original layout -> {path}")
    return 0
