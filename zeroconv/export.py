"""Sharing a trained ControlNet: `zeroconv export`, `zeroconv import`, `zeroconv push`.

export: a diffusers ControlNet (a folder, or the output_dir of `zeroconv train`) -> one .safetensors in the
original layout that AUTOMATIC1111 and ComfyUI load (lllyasviel's keys), one .safetensors with diffusers' keys
(what `ControlNetModel.from_single_file` loads as it is; ComfyUI reads it too), or a diffusers folder in another
dtype. The diffusers config rides along in the file's metadata, so `import` restores the folder exactly.
Tensors are renamed, never copied (only cast when --dtype asks), so exporting costs about one model of memory.
A run trained with `--sd_locked false` also has its decoder exported: a full UNet folder in diffusers layout,
and in the original layout a full SD + ControlNet file like lllyasviel's 1.0 releases.

push: the final model, its card and validation grids to the Hub; never checkpoints or optimizer states.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from zeroconv.config import option, parse
from zeroconv.errors import UserError
from zeroconv.hub import DECODER_FOLDER, check_push_possible, files_to_push, push_folder
from zeroconv.models.dtypes import DTYPES
from zeroconv.models.single_file import CONFIG_METADATA, save_aligned

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# --- reading a diffusers model folder ---------------------------------------------------------------------------

def controlnet_folder(path: str | Path) -> Path:
    """The folder holding a diffusers ControlNet: `path` itself (a model folder or a run's output_dir)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    config = path / "config.json"
    if not config.is_file():
        hint = " (training has not saved its final model yet; pick a checkpoint-*/controlnet folder)" if any(
            path.glob("checkpoint-*")) else ""
        raise UserError(f"{path}: no config.json; expected a diffusers ControlNet folder or a zeroconv run{hint}")
    if json.loads(config.read_text()).get("_class_name") != "ControlNetModel":
        raise UserError(f"{path}: config.json is not a ControlNetModel's")
    return path


def load_folder_weights(folder: Path, dtype: torch.dtype | None = None) -> dict:
    """A diffusers model folder's tensors (one file or shards), each cast to `dtype` as it is read."""
    from safetensors import safe_open

    index = folder / (WEIGHTS_NAME + ".index.json")
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif (folder / "diffusion_pytorch_model.bin").is_file():
        state = torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        return {key: cast(value, dtype) for key, value in state.items()}
    else:
        raise UserError(f"{folder}: no {WEIGHTS_NAME} (or .bin) weights")
    tensors = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                tensors[key] = cast(handle.get_tensor(key), dtype)
    return tensors


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def run_base(run: Path) -> str | None:
    """The base model a zeroconv run was trained on, from the config.yaml it saved."""
    import yaml

    saved = run / "config.yaml"
    if saved.is_file():
        return (yaml.safe_load(saved.read_text()) or {}).get("pretrained_model_name_or_path")
    return None


# --- export -------------------------------------------------------------------------------------------------------

def export_original(folder: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                    prefix: str = "control_model.") -> Path:
    """A diffusers ControlNet folder -> one original-layout .safetensors (config in the metadata)."""
    from zeroconv.models import formats

    folder, out = controlnet_folder(folder), Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the original-layout file is written as .safetensors; change the suffix")
    config = read_config(folder)
    tensors = formats.controlnet_to_original(load_folder_weights(folder, dtype), config, prefix=prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_aligned(tensors, out, {"format": "pt", "zeroconv.layout": "original", "zeroconv.prefix": prefix,
                                       CONFIG_METADATA["controlnet"]: json.dumps(config)})


def keys_diffusers_drops(file: Path, config: dict) -> list[str]:
    """The ControlNet keys that diffusers' own reader of the original layout (convert_controlnet_checkpoint, what
    `from_single_file` runs) does not map: from_single_file would leave them unloaded. Asked of the installed
    diffusers rather than assumed, so the warning goes away the day diffusers maps them (up to 0.42 it skips the
    SDXL add-embedding, label_emb.*)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors import safe_open

    from zeroconv.models import formats

    with safe_open(str(file), "pt") as handle:  # names only: the converter renames, it reads no values
        original = {key: torch.empty(0, device="meta") for key in handle.keys()}
    converted = convert_controlnet_checkpoint(original, dict(config))
    return sorted(set(formats.empty_controlnet(config).state_dict()) - set(converted))


def export_diffusers_file(folder: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A diffusers ControlNet folder -> one .safetensors with diffusers' key names (config in the metadata), the
    layout of the diffusers_xl_* files people share: from_single_file loads it without converting a key."""
    folder, out = controlnet_folder(folder), Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the single file is written as .safetensors; change the suffix")
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_aligned(load_folder_weights(folder, dtype), out, {
        "format": "pt", "zeroconv.layout": "diffusers", CONFIG_METADATA["controlnet"]: json.dumps(read_config(folder))})


def export_diffusers(folder: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A diffusers model folder copied to `out` (weights cast to `dtype`), without anything else of a run."""
    folder, out = Path(folder), Path(out)
    if out.resolve() == folder.resolve():
        raise UserError(f"--out {out}: same folder as the model; choose another")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "config.json", out / "config.json")
    save_aligned(load_folder_weights(folder, dtype), out / WEIGHTS_NAME, {"format": "pt"})
    return out


def export_combined(run: Path, out: Path, base: str, dtype: torch.dtype | None = None) -> Path:
    """A `--sd_locked false` run: its trained UNet with the base's VAE and text encoder, plus the ControlNet."""
    from diffusers import UNet2DConditionModel

    from zeroconv.models.base import check_base_arg
    from zeroconv.models.single_file import save_combined

    check_base_arg(base, flag="--base")
    unet = UNet2DConditionModel.from_pretrained(run / DECODER_FOLDER)
    return save_combined(out, load_folder_weights(run), read_config(run), base, unet=unet, dtype=dtype)


@dataclass
class ExportConfig:
    model: str | None = option(None, "A diffusers ControlNet folder, or the output_dir of `zeroconv train`.")
    format: str = option("original", "original: one .safetensors for AUTOMATIC1111/ComfyUI (lllyasviel's keys); "
                         "diffusers_file: one .safetensors with diffusers' keys, which "
                         "ControlNetModel.from_single_file loads whole (SDXL's add-embedding too, which diffusers "
                         "does not read from the original layout) and ComfyUI reads; diffusers: a diffusers folder.",
                         choices=["original", "diffusers_file", "diffusers"])
    dtype: str | None = option(None, "Cast the weights: fp16 (the usual for sharing), bf16 or fp32 (default: as "
                               "stored).", choices=list(DTYPES))
    prefix: str = option("control_model.", "Key prefix of the original layout ('control_model.' as lllyasviel's "
                         "files; '' for none).")
    out: str | None = option(None, "Output .safetensors (original, diffusers_file) or folder (diffusers). Default: "
                             "<model>/<name>.safetensors (diffusers_file: <name>-diffusers.safetensors), or "
                             "<name>-diffusers beside the model.")
    base: str | None = option(None, "Base SD model for the full SD + ControlNet file of a run trained with "
                              "--sd_locked false (default: the base recorded in the run's config.yaml).")
    combined: str | None = option(None, "Where to write that full SD + ControlNet file (default: <out>-sd.safetensors).")


def main(argv: list[str]) -> int:
    config = parse(ExportConfig, argv, prog="zeroconv export", description=__doc__, positional=("model",))
    run = controlnet_folder(config.model)
    dtype = DTYPES[config.dtype] if config.dtype else None
    name = run.resolve().name + (f"-{config.dtype}" if config.dtype else "")
    has_decoder = (run / DECODER_FOLDER / "config.json").is_file()
    if config.format == "original":
        out = Path(config.out or run / f"{name}.safetensors")  # inside the run: `push` then shares it too
        export_original(run, out, dtype, config.prefix)
        print(f"ControlNet, original layout -> {out}")
        dropped = keys_diffusers_drops(out, read_config(run))
        if dropped:
            named = ", ".join(dropped[:2]) + (", ..." if len(dropped) > 2 else "")
            print(f"note: diffusers' from_single_file does not read {len(dropped)} keys of this layout ({named}) "
                  f"and would leave them unloaded; for diffusers users also share "
                  f"`zeroconv export {config.model} --format diffusers_file`")
        if has_decoder:
            base = config.base or run_base(run)
            if not base:
                raise UserError(f"{run}: the run trained the UNet decoder; pass --base (the SD model it was trained "
                                "on) to write the full SD + ControlNet file")
            combined = Path(config.combined or out.with_name(out.stem + "-sd.safetensors"))
            export_combined(run, combined, base, dtype)
            print(f"trained UNet + base VAE/text encoder + ControlNet, original layout -> {combined}")
        write_export_card(run, out.parent, single_file=out.name)
    elif config.format == "diffusers_file":
        out = Path(config.out or run / f"{name}-diffusers.safetensors")
        export_diffusers_file(run, out, dtype)
        print(f"ControlNet, diffusers keys in one file -> {out}")
    else:
        out = Path(config.out or run.parent / f"{name}-diffusers")
        export_diffusers(run, out, dtype)
        if has_decoder:
            export_diffusers(run / DECODER_FOLDER, out / DECODER_FOLDER, dtype)
        write_export_card(run, out)
        print(f"ControlNet, diffusers layout -> {out}")
    return 0


def write_export_card(run: Path, out_dir: Path, single_file: str | None = None) -> None:
    """The run's card (or a minimal one) beside the export, naming the exported file. An existing README.md
    that zeroconv did not write is left alone."""
    from zeroconv.card import CARD_NAME, read_card_info, write_model_card

    target = out_dir / CARD_NAME
    if target.is_file() and not read_card_info(out_dir) and target.resolve() != (run / CARD_NAME).resolve():
        print(f"{target} exists and was not written by zeroconv: model card not written")
        return
    info = read_card_info(run) or {"base_model": run_base(run)}
    if single_file:
        info["single_file"] = single_file
    if info.get("validation_grid") and out_dir.resolve() != run.resolve():
        info["validation_grid"] = None  # the grid stays with the run; its relative path would not resolve here
    write_model_card(out_dir, info)


# --- import -------------------------------------------------------------------------------------------------------

@dataclass
class ImportConfig:
    file: str | None = option(None, "An original-layout ControlNet .safetensors/.ckpt/.pth (or a full SD + "
                              "ControlNet file: its control_model.* part is taken), or one with diffusers' keys "
                              "(`export --format diffusers_file`).")
    out: str | None = option(None, "Folder for the diffusers ControlNet. Required.")
    model_config: str | None = option(None, "A diffusers ControlNet folder or config.json whose config to use (default: "
                                "the file's metadata, else inferred from the weights' shapes).")


def import_original(file: str | Path, out: str | Path, config_source: str | None = None) -> Path:
    """An original-layout ControlNet file -> a diffusers folder. Bit-exact inverse of export_original.

    Keys go through the exact inverse of zeroconv's own mapping (verified against diffusers' converter in the
    tests), which unlike diffusers' also handles condition encoders of other depths than SD's 8x."""
    from zeroconv.models import formats
    from zeroconv.models.single_file import read_checkpoint

    checkpoint, metadata = read_checkpoint(file)
    diffusers_keys = "controlnet_cond_embedding.conv_in.weight" in checkpoint  # `export --format diffusers_file`
    try:
        prefix = "" if diffusers_keys else formats.detect_control_prefix(checkpoint)
    except formats.UnknownKeyError:
        raise UserError(f"{file}: no input_hint_block keys; not an original-layout ControlNet") from None
    if diffusers_keys and not config_source and CONFIG_METADATA["controlnet"] not in metadata:
        raise UserError(f"{file}: a ControlNet with diffusers' keys and no config in its metadata; pass "
                        "--model_config the diffusers ControlNet folder (or config.json) it was saved from")
    if config_source:
        source = Path(config_source)
        source = source / "config.json" if source.is_dir() else source
        if not source.is_file():
            raise UserError(f"--model_config {config_source}: no such config.json")
        config = json.loads(source.read_text())
    elif CONFIG_METADATA["controlnet"] in metadata:
        config = json.loads(metadata[CONFIG_METADATA["controlnet"]])
    else:
        config = formats.infer_controlnet_config(checkpoint, prefix)
    control = {key: value for key, value in checkpoint.items() if key.startswith(prefix)}
    try:
        tensors = (formats.controlnet_from_diffusers_keys(control, config) if diffusers_keys
                   else formats.controlnet_from_original(control, config, prefix=prefix))
    except formats.UnknownKeyError as exc:
        raise UserError(f"{file}: {exc}; pass --model_config a matching diffusers ControlNet folder") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    formats.empty_controlnet(config).save_config(out)
    save_aligned(tensors, out / WEIGHTS_NAME, {"format": "pt"})
    return out


def import_main(argv: list[str]) -> int:
    config = parse(ImportConfig, argv, prog="zeroconv import", description=import_original.__doc__,
                   positional=("file",))
    if not config.out:
        raise UserError("--out is required: the folder to write the diffusers ControlNet to")
    out = import_original(config.file, config.out, config.model_config)
    print(f"ControlNet, diffusers layout -> {out}")
    return 0


# --- push ---------------------------------------------------------------------------------------------------------

@dataclass
class PushConfig:
    run: str | None = option(None, "The output_dir of `zeroconv train` (or a model folder, or an export).")
    repo: str | None = option(None, "Hub repository id, e.g. user/controlnet-canny. Required.")
    token: str | None = option(None, "Hub token (default: HF_TOKEN or the one saved by `hf auth login`).")
    private: bool = option(False, "Create the repository as private.")


def push_main(argv: list[str]) -> int:
    config = parse(PushConfig, argv, prog="zeroconv push", description=__doc__, positional=("run",))
    if not config.repo:
        raise UserError("--repo is required: the Hub repository id to upload to, e.g. user/controlnet-canny")
    folder = Path(config.run)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    check_push_possible(config.repo, config.token)
    files = files_to_push(folder)
    print(f"uploading {len(files)} files to {config.repo}: {', '.join(files[:6])}{' ...' if len(files) > 6 else ''}")
    print(push_folder(folder, config.repo, config.token, config.private))
    return 0
