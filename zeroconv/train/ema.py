"""An exponential moving average of the ControlNet's weights (`--use_ema`), on diffusers' EMAModel.

Which weights are which, when it is on:
- the optimizer trains the live weights; they are what the next step starts from, saved in checkpoint-N/controlnet
  and, at the end, in output_dir/without_ema;
- the average is what validation samples and what output_dir holds at the end (the model `zeroconv sample`,
  diffusers and the Hub load), saved in checkpoint-N/controlnet_ema.
EMAModel warms its decay up as min(--ema_decay, (1 + n) / (10 + n)) after n updates, so the average follows the
weights closely early on (decay 0.92 at update 100, 0.99 at 800) instead of lagging behind the initial ones.
A skipped (non-finite) step does not update the average. Resume restores the average and its update count exactly.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from zeroconv.hub import EMA_FOLDER


class ControlNetEMA:
    def __init__(self, controlnet: torch.nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        self.controlnet = controlnet  # unwrapped: the same parameters the optimizer updates
        self.average = EMAModel(controlnet.parameters(), decay=decay)

    def update(self) -> None:
        self.average.step(self.controlnet.parameters())

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the live ControlNet for the duration (validation, saving), then the live ones
        back, bit for bit."""
        params = list(self.controlnet.parameters())
        self.average.store(params)
        self.average.copy_to(params)
        try:
            yield self.controlnet
        finally:
            self.average.restore(params)

    def save(self, checkpoint: Path) -> None:
        with self.applied() as averaged:
            averaged.save_pretrained(checkpoint / EMA_FOLDER, safe_serialization=True)
        (checkpoint / EMA_FOLDER / "ema_state.json").write_text(json.dumps(
            {"optimization_step": self.average.optimization_step, "decay": self.average.decay}))

    def load(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        from zeroconv.errors import UserError

        folder = checkpoint / EMA_FOLDER
        if not (folder / "ema_state.json").is_file():
            raise UserError(f"--resume_from_checkpoint {checkpoint}: has no {EMA_FOLDER}/ (saved without --use_ema); "
                            "resume without --use_ema, or start a new output_dir")
        weights = load_file(folder / "diffusion_pytorch_model.safetensors")
        with torch.no_grad():
            for (name, _), shadow in zip(self.controlnet.named_parameters(), self.average.shadow_params):
                shadow.copy_(weights[name])
        self.average.optimization_step = json.loads((folder / "ema_state.json").read_text())["optimization_step"]
