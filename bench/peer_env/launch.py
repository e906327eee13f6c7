"""Run a peer training script (diffusers' examples/controlnet/train_*.py) with the torchvision stand-in.

    python bench/peer_env/launch.py PATH/train_controlnet.py [its flags]

transformers and diffusers ask once, at import, whether torchvision is installed, and switch on image code of
their own when it is; the stand-in (bench/peer_env/shim/torchvision) only has what the scripts call. So both
libraries are imported first, while torchvision is absent, and the stand-in is put on the path after that,
for the script's own `from torchvision import transforms`.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "shim"


def isolate_torchvision() -> None:
    """Let transformers and diffusers see no torchvision, then make the stand-in importable."""
    import diffusers  # noqa: F401
    from diffusers.utils import import_utils as diffusers_imports
    from transformers.utils import import_utils as transformers_imports

    transformers_imports.is_torchvision_available()  # lru-cached False from here on
    assert not diffusers_imports.is_torchvision_available()
    # the lazy modules the scripts import, resolved now, while torchvision is still absent
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, PreTrainedModel  # noqa: F401

    sys.path.insert(0, str(SHIM))


def run_script(script: str, argv: list[str]) -> None:
    """Execute `script` as __main__ with `argv` as its command line (after isolate_torchvision)."""
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    isolate_torchvision()
    run_script(sys.argv[1], sys.argv[2:])
