"""The model card: README.md with Hub metadata, written at every final save and export.

The YAML header holds the Hub's fields (license, base_model, tags, library) and, under `zeroconv:`, the whole
`info` dict, so a later export or push reads the run's facts back (`read_card_info`) instead of guessing them.
"""

from __future__ import annotations

from pathlib import Path

CARD_NAME = "README.md"
DEFAULT_LICENSE = "creativeml-openrail-m"  # the license of SD 1.x weights, which a ControlNet's encoder copies
HUB_ID_LIKE = r"^[\w.-]+/[\w.-]+$"


def _is_hub_id(text) -> bool:
    import re

    return isinstance(text, str) and bool(re.match(HUB_ID_LIKE, text)) and not Path(text).exists()


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def usage_snippets(repo_id: str, base_model: str | None, single_file: str | None) -> str:
    base = base_model if _is_hub_id(base_model) else "path/to/the/sd-base"
    diffusers_snippet = f"""```python
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from diffusers.utils import load_image

controlnet = ControlNetModel.from_pretrained("{repo_id}", torch_dtype=torch.float16)
pipe = StableDiffusionControlNetPipeline.from_pretrained(
    "{base}", controlnet=controlnet, torch_dtype=torch.float16
).to("cuda")
image = pipe("a prompt", image=load_image("condition.png"), num_inference_steps=20).images[0]
```"""
    file_name = single_file or "<name>.safetensors"
    original_snippet = f"""Export the original (A1111/ComfyUI) layout with
`zeroconv export {repo_id.split('/')[-1]} --format original --dtype fp16 --out {file_name}`{' (included here)' if single_file else ''}, then:

- **ComfyUI**: put `{file_name}` in `ComfyUI/models/controlnet/` and use *Load ControlNet Model* + *Apply ControlNet*.
- **AUTOMATIC1111** (sd-webui-controlnet): put it in `extensions/sd-webui-controlnet/models/`, refresh the model
  list in the ControlNet panel, and pick the matching preprocessor (or none, for ready-made condition images)."""
    return f"### diffusers\n\n{diffusers_snippet}\n\n### ComfyUI / AUTOMATIC1111\n\n{original_snippet}\n"


def card_text(info: dict, model_dir: Path) -> str:
    from huggingface_hub import ModelCardData

    base_model = info.get("base_model")
    repo_id = info.get("repo_id") or model_dir.resolve().name
    condition = info.get("condition")
    tags = ["controlnet", "stable-diffusion", "diffusers", "zeroconv"]
    if condition:
        tags.append("condition-" + str(condition).replace(" ", "-"))
    data = ModelCardData(
        license=info.get("license") or DEFAULT_LICENSE,
        base_model=base_model if _is_hub_id(base_model) else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        datasets=[info["dataset"]] if _is_hub_id(info.get("dataset")) else None,
        tags=tags,
        zeroconv={key: value for key, value in info.items() if value is not None},
    )
    facts = [("Base model", base_model), ("Condition", condition), ("Dataset", info.get("dataset")),
             ("Training steps", info.get("steps")), ("Effective batch", info.get("effective_batch")),
             ("Resolution", info.get("resolution")), ("Decoder trained (sd_locked false)",
                                                      None if info.get("sd_locked") is None else not info["sd_locked"])]
    title = "ControlNet" + (f" ({condition})" if condition else "") + (f" for {base_model}" if base_model else "")
    lines = [f"# {title}", "",
             "Trained with zeroconv.", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_format(value)} |" for name, value in facts if value is not None]
    controllability = info.get("controllability") or {}
    if controllability:
        lines += ["", "## Controllability", "", "Measured on the validation set at the last validation:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_format(value)} |" for name, value in sorted(controllability.items())]
    grid = info.get("validation_grid")
    if grid:
        grid_path = Path(grid)
        if grid_path.is_absolute() and grid_path.is_relative_to(model_dir.resolve()):
            grid = str(grid_path.relative_to(model_dir.resolve()))
        lines += ["", "## Validation samples", "", f"![validation grid]({grid})"]
    lines += ["", "## Usage", "", usage_snippets(repo_id, base_model, info.get("single_file"))]
    lines += ["## License", "", f"{data.license}: the license of the base model's weights, which the ControlNet's "
              "encoder is a copy of."]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(model_dir, info: dict) -> Path:
    """Write `model_dir`/README.md. `info` keys (all optional): base_model, condition, dataset, steps,
    effective_batch, resolution, controllability ({metric: value}), validation_grid (path, relative to
    model_dir or inside it), license, repo_id, single_file (an exported original-layout file's name),
    sd_locked, and anything else worth keeping (stored in the metadata)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CARD_NAME
    path.write_text(card_text(info, model_dir), encoding="utf-8")
    return path


def read_card_info(model_dir) -> dict:
    """The `info` a previous write_model_card stored in `model_dir`/README.md ({} if there is none)."""
    from huggingface_hub import ModelCard

    path = Path(model_dir) / CARD_NAME
    if not path.is_file():
        return {}
    return dict(ModelCard.load(path).data.to_dict().get("zeroconv") or {})
