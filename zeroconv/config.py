"""Typed configs: one dataclass per command, each field documented; that text is the --help.

`option(default, "help")` declares a field. `parse(ConfigClass, argv, prog=...)` builds the argparse parser
from the dataclass, reads `--config FILE.yaml` first (its keys are field names), then applies the command
line on top, so `zeroconv train --config run.yaml --learning_rate 1e-5` works. The resolved config is a plain
dataclass: `to_dict` / `from_dict` carry it into output folders and checkpoints.

Flag spelling follows diffusers' example scripts (`--train_batch_size`, not `--train-batch-size`) so their
users change only the program name. Booleans accept `--flag` (true), `--flag true` and `--flag false`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from zeroconv.errors import UserError


def option(default: Any = None, help: str = "", *, choices: list | None = None, metavar: str | None = None):
    """A documented config field. Mutable defaults (lists) are copied per instance."""
    meta = {"help": help, "choices": choices, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on", "y"):
        return True
    if low in ("0", "false", "no", "off", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _unwrap_optional(tp):
    """Optional[X] / X | None -> (X, True); X -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def build_parser(cls, prog: str, description: str = "", positional: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser whose options are `cls`'s fields; help text is the field's doc plus its default.

    Fields named in `positional` become positional arguments (required, no default shown)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=" ".join([prog, *(name.upper() for name in positional), "[options]"]),
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of option values (keys are the option names); flags given on the command "
                        "line override it. The resolved config is saved beside every output. (default: none)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _optional = _unwrap_optional(hints[f.name])
        default = _field_default(f)
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{help_text} (default: {default!r})".replace("%", "%%")}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar=kwargs.get("metavar", "BOOL"))
        elif origin is list:
            (item_tp,) = typing.get_args(tp) or (str,)
            kwargs.update(type=item_tp, nargs="+")
        elif tp in (int, float) and _optional:  # `--snr_gamma none` turns an option off that is on by default
            kwargs["type"] = lambda text, tp=tp: None if text.strip().lower() in ("none", "null") else tp(text)
            kwargs["type"].__name__ = tp.__name__  # argparse names the type in its error message
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if f.name in positional:
            kwargs.pop("dest")
            kwargs["help"] = help_text
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, **kwargs)
    return parser


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def from_dict(cls, values: dict, source: str = "config"):
    """Build `cls` from a dict, refusing unknown keys (naming them and the closest known ones)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise UserError(f"{source}: unknown option(s): {', '.join(hints)}")
    hints_t = typing.get_type_hints(cls)
    coerced = {}
    for key, value in values.items():
        tp, _ = _unwrap_optional(hints_t[key])
        if value is not None and tp is bool:
            try:
                value = parse_bool(value)
            except argparse.ArgumentTypeError as exc:
                raise UserError(f"{source}: {key}: {exc}") from None
        elif value is not None and typing.get_origin(tp) is list and not isinstance(value, list):
            value = [value]
        elif value is not None and tp in (int, float):
            try:
                value = tp(value)
            except (TypeError, ValueError):
                raise UserError(f"{source}: {key}: expected {tp.__name__}, got {value!r}") from None
        coerced[key] = value
    return cls(**coerced)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def parse(cls, argv: list[str] | None, prog: str, description: str = "", positional: tuple[str, ...] = ()):
    """Parse `argv` into a `cls` instance: dataclass defaults < --config YAML < command-line flags."""
    parser = build_parser(cls, prog, description, positional)
    ns = parser.parse_args(argv)
    cli_values = vars(ns)
    config_path = cli_values.pop("config", None)
    values = load_yaml(config_path) if config_path else {}
    values.update(cli_values)
    return from_dict(cls, values, source=f"--config {config_path}" if config_path else prog)


def save_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def validation_pairs(prompts: list[str] | None, images: list[str] | None) -> list[tuple[str, str]]:
    """diffusers' pairing rule: equal counts pair up; a single prompt or image is used with all of the other."""
    if not prompts and not images:
        return []
    if not prompts or not images:
        missing = "--validation_prompt" if not prompts else "--validation_image"
        given = "--validation_image" if not prompts else "--validation_prompt"
        raise UserError(f"{given} is set but {missing} is not; give both (one of either, or equal counts)")
    if len(images) == len(prompts):
        return list(zip(images, prompts))
    if len(images) == 1:
        return [(images[0], p) for p in prompts]
    if len(prompts) == 1:
        return [(i, prompts[0]) for i in images]
    raise UserError(f"{len(prompts)} --validation_prompt and {len(images)} --validation_image do not pair up: give "
                    "equal counts, or one of either")


# SDXL's training buckets (width, height): about 1024 x 1024 pixels each, sides multiples of 64. --aspect_buckets
# default scales them to --resolution, so SD 1.x at 512 and the tiny bases at 64 get the same shapes.
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536))


def parse_aspect_buckets(spec: str, resolution: int) -> list[tuple[int, int]]:
    """--aspect_buckets as (width, height) pixel sizes: 'default' (SDXL_BUCKETS scaled to `resolution`, sides
    rounded to the nearest multiple of 8, duplicates dropped) or 'WxH,WxH,...'."""
    if spec.strip().lower() == "default":
        sizes = [tuple(max(8, int(side * resolution / 1024 / 8 + 0.5) * 8) for side in size) for size in SDXL_BUCKETS]
        return list(dict.fromkeys(sizes))
    sizes = []
    for item in spec.replace(" ", "").split(","):
        width, _, height = item.lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise UserError(f"--aspect_buckets {spec}: {item!r} is not WxH; give 'default' or sizes like "
                            "'512x512,576x448,448x576'")
        size = (int(width), int(height))
        if min(size) < 8 or size[0] % 8 or size[1] % 8:
            raise UserError(f"--aspect_buckets {spec}: {item} has a side that is not a positive multiple of 8 (the "
                            f"VAE's latent grid); try {max(8, size[0] // 8 * 8)}x{max(8, size[1] // 8 * 8)}")
        sizes.append(size)
    return list(dict.fromkeys(sizes))


# ---------------------------------------------------------------------------------------------------------------
# zeroconv train. The first block is diffusers' examples/controlnet/train_controlnet.py, same names and meanings,
# so `accelerate launch -m zeroconv train <their flags>` runs where their script did.
# ---------------------------------------------------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402


# Initial weights of the ControlNet condition encoder (zeroconv.models.controlnet.build_controlnet).
CONDITION_ENCODER_INITS = ("paper", "unit_variance")

@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = option(
        None, "Base SD 1.x/2.x, SDXL, SD3/SD3.5 or Flux.1 model: a diffusers folder, a hub id, a single "
        ".ckpt/.safetensors file (SD 1.x/2.x, SDXL), or 'toy' for the toy base shipped with zeroconv. Required.")
    controlnet_model_name_or_path: str | None = option(
        None, "Start from this ControlNet (diffusers folder or hub id) instead of copying the base UNet's encoder.")
    pretrained_vae_model_name_or_path: str | None = option(
        None, "Load the VAE from this folder or hub id instead of the base's, as diffusers' train_controlnet_sdxl.py: "
        "e.g. madebyollin/sdxl-vae-fp16-fix, SDXL's VAE fine-tuned not to overflow in fp16 (the base's is kept in "
        "float32 under fp16, this one need not be). It is part of the latent cache's key and of what a resume must "
        "match. Unset: the base's own VAE.")
    revision: str | None = option(None, "Revision (branch, tag or commit) of the base model on the hub.")
    variant: str | None = option(None, "Variant of the base weights to load, e.g. 'fp16'.")
    tokenizer_name: str | None = option(None, "Tokenizer to use instead of the base model's.")
    cache_dir: str | None = option(None, "Where downloaded models and datasets are stored.")
    sd_locked: bool = option(
        True, "Keep the base UNet's decoder frozen (the paper's default). 'false' also trains the decoder (up_blocks, "
        "conv_norm_out, conv_out) at --decoder_learning_rate; risky on small data.")
    decoder_learning_rate: float = option(2e-6, "Learning rate of the UNet decoder when --sd_locked false.")
    only_mid_control: bool = option(
        False, "Feed only the middle-block residual to the UNet (the paper's small-scale mode, ~1.6x faster).")
    conditioning_channels: int = option(3, "Channels of the conditioning image: 1 (grayscale), 3 (RGB), 4 (RGBA).",
                                        choices=[1, 3, 4])
    condition_encoder_init: str | None = option(
        None, "Initial weights of the ControlNet's condition encoder (the small convnet that brings the condition "
        "image onto the latent grid; SD and SDXL: SD3 and Flux embed the condition's latents from zero and have "
        "only 'paper'). Unset: 'unit_variance', He-normal weights, zero biases: the condition reaches the zero "
        "convolution 8x stronger than with PyTorch's default init (which weakens it 30-60x), so the hint path "
        "learns from the first steps (Fill demo, earlier toy base: fill IoU 0.80 by step 200 instead of 450, the same "
        "at step 800). "
        "'paper': PyTorch's default init, as lllyasviel's code and diffusers. Either way the last conv is zero "
        "and the untrained ControlNet changes nothing.", choices=list(CONDITION_ENCODER_INITS))
    num_layers: int = option(
        12, "SD3: joint blocks of the ControlNet, copied from the base transformer's first ones (diffusers' "
        "SD3ControlNetModel.from_transformer default, which train_controlnet_sd3.py uses). SD and SDXL copy the "
        "whole UNet encoder and do not read it.")
    num_extra_conditioning_channels: int = option(
        0, "SD3: condition channels beyond the VAE latents' (an inpainting ControlNet's mask), as "
        "train_controlnet_sd3.py; 0, its default, is all zeroconv's data supplies.")
    upcast_vae: bool = option(
        False, "Run the VAE in float32 whatever --mixed_precision (as train_controlnet_sd3.py): a half-precision "
        "VAE can overflow into NaN latents. Off by default, as there; SDXL's VAE (force_upcast) is upcast anyway.")
    max_sequence_length: int | None = option(
        None, "SD3 and Flux: T5 tokens per prompt, in training and in validation samples. Default: the example "
        "script's, SD3 77 (train_controlnet_sd3.py; SD3's pipeline samples with 256, a longer prompt than 77 "
        "tokens is cut), Flux 512 (train_controlnet_flux.py, through FluxPipeline.encode_prompt).")
    num_double_layers: int = option(
        4, "Flux: double-stream blocks of the ControlNet, copied from the base transformer's first ones "
        "(train_controlnet_flux.py's flag and default). Other families do not read it.")
    num_single_layers: int = option(
        10, "Flux: single-stream blocks of the ControlNet, copied likewise (train_controlnet_flux.py's default 10).")
    guidance_scale: float = option(
        3.5, "Flux: the guidance embedding's value in training, for guidance-distilled bases (FLUX.1-dev; "
        "train_controlnet_flux.py's flag and default). A base without a guidance embedding (FLUX.1-schnell) and "
        "the other families do not read it; validation samples use --validation_guidance_scale.")
    save_weight_dtype: str = option(
        "fp32", "Precision of the final ControlNet in output_dir (train_controlnet_flux.py's flag and default): fp16 "
        "or bf16 halve the file. Written under the plain file name, so every loader finds it without a variant; "
        "checkpoints keep float32.", choices=["fp32", "fp16", "bf16"])
    enable_model_cpu_offload: bool = option(
        False, "Validation samples with diffusers' model CPU offload (as train_controlnet_flux.py): each model goes to "
        "the GPU only while it runs. Needs a GPU; off by default.")
    # --- output and checkpoints -------------------------------------------------------------------------------
    output_dir: str = option("controlnet-model", "Where the model, checkpoints, validation grids and logs go.")
    seed: int | None = option(None, "Seed for reproducible training (weights init, data order, noise).")
    checkpointing_steps: int = option(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = option(
        None, "Keep at most this many checkpoints; older ones are deleted after a new one is complete.")
    resume_from_checkpoint: str | None = option(
        None, "Resume from a checkpoint folder, or 'latest' for the newest complete one in output_dir.")
    # --- data --------------------------------------------------------------------------------------------------
    dataset_name: str | None = option(
        None, "A `datasets` dataset: hub id, local dataset script or folder, or a save_to_disk folder.")
    dataset_config_name: str | None = option(None, "Config name of the dataset, if it has several.")
    streaming: bool = option(
        False, "Stream --dataset_name instead of downloading it (the name of datasets' load_dataset(..., "
        "streaming=True)): its train split's parquet files (a hub id, or a local folder or .parquet file) are read "
        "as training goes, never whole, each file a shard of the webdataset stream (see --train_data_dir): "
        "permuted per epoch, split across processes and loader workers, mixed in --shuffle_buffer, a sample's "
        "index its row position in the file list. Row counts come from the files' footers, so every process takes "
        "the same steps, and a resume continues exactly, skipping the files already consumed. Parquet only (what "
        "datasets' push_to_hub writes); other formats are refused. The latent cache serves it as it serves a "
        "dataset read whole (one cache shard per file; with --condition it trains live). Not with --aspect_buckets, "
        "--conditioning_image_columns or --max_train_samples.")
    train_data_dir: str | None = option(
        None, "A local folder: imagefolder layout (metadata.jsonl with file_name, conditioning_image_file_name, "
        "text), Fill50K layout (prompt.json, source/, target/), kohya pair (images/ + conditioning/ + .txt), or "
        "webdataset tar shards with their shards.json (`zeroconv prepare --format webdataset`), streamed: each "
        "epoch permutes the shards, splits them across processes and loader workers, and mixes samples in "
        "--shuffle_buffer; a resume skips the shards already consumed. Such a shard folder may also be a URL, "
        "streamed through fsspec with its backend installed (s3://bucket/shards with s3fs, gs:// with gcsfs, "
        "hf://datasets/owner/name/shards, https://): the prepared folder uploaded as is; a URL of anything else is "
        "refused. The latent cache serves shards as it serves the other layouts (one cache shard per data shard, "
        "on a local disk; with --condition they train live).")
    jsonl_for_train: str | None = option(
        None, "A JSON-lines file of training rows, read with datasets' json builder as train_controlnet_sd3.py and "
        "train_controlnet_flux.py read it: one object per line holding --image_column, "
        "--conditioning_image_column and --caption_column; image values are file paths (relative ones from the "
        "working directory, as there). Instead of --dataset_name or --train_data_dir.")
    image_column: str = option("image", "Dataset column holding the target image.")
    conditioning_image_column: str = option("conditioning_image", "Dataset column holding the conditioning image.")
    caption_column: str = option("text", "Dataset column holding the caption (or a list of captions).")
    conditioning_image_columns: str | None = option(
        None, "Train one union ControlNet on several condition types (SDXL: diffusers' ControlNetUnionModel; Flux: "
        "FluxControlNetModel with num_mode, one type per sample; SD 1.x/2.x and SD3 have none): "
        "comma-separated dataset columns, one per type, e.g. 'depth,canny' (imagefolder: depth_file_name, "
        "canny_file_name in metadata.jsonl; datasets and --jsonl_for_train: the column names). Control mode k (the "
        "pipeline's control_mode) is the k-th column. Each sample draws which types it is given (see "
        "--union_condition_weights and --union_extra_condition_probability) per (seed, epoch, sample), like its "
        "flip, so a resume sees the same draws; only those conditions are read. Instead of "
        "--conditioning_image_column. Not with --condition, --consistency_loss_weight or --cache on/only (auto "
        "encodes live).", metavar="COLUMN,COLUMN,...")
    union_condition_weights: str | None = option(
        None, "Union ControlNet: comma-separated weights of the condition types, one per "
        "--conditioning_image_columns column: each sample's first type is drawn with these weights (normalised). "
        "Unset: equal weights.", metavar="W,W,...")
    union_extra_condition_probability: float = option(
        0.0, "Union ControlNet: the probability that each other type is given to a sample too, independently, so "
        "the network learns to combine conditions. Type k is then given with probability w_k + (1 - w_k) p (w_k "
        "its normalised weight). 0: exactly one type per sample, as sampling with one control_mode.")
    max_train_samples: int | None = option(None, "Use only the first N examples (debugging, quick runs).")
    resolution: int = option(512, "Training resolution: shorter side resized to it, then cropped square (centered; "
                             "see --random_crop; --aspect_buckets for other shapes). Must be divisible by 8.")
    random_flip: bool = option(False, "Randomly flip image and condition horizontally together.")
    image_interpolation_mode: str = option(
        "bilinear", "Filter that resizes image and condition to --resolution (diffusers' SDXL scripts' names; PIL's "
        "filters). 'nearest' keeps a condition's exact values (label maps, masks).",
        choices=["bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"])
    random_crop: bool = option(
        False, "Crop the R x R square (or the sample's --aspect_buckets size) at a random place of the resized image "
        "(the same for image and condition, new every epoch) instead of its center. SDXL is told the crop's offset (its crops_coords_top_left). Not with "
        "--cache: the cache stores one crop.")
    aspect_buckets: str | None = option(
        None, "Train on whole images of any shape instead of square crops: each image goes to the bucket (a WxH "
        "size) nearest its aspect ratio, is resized to cover it and cropped to it (centered, or at random with "
        "--random_crop; image and condition alike), and every batch holds one bucket. 'default': SDXL's buckets of "
        "about 1024x1024 pixels (1024x1024, 1152x896, 1216x832, 1344x768, 1536x640 and their transposes) scaled to "
        "--resolution, so about R x R pixels each (at 512: 512x512 ... 768x320), every side rounded to a multiple of "
        "8, the VAE's latent grid. Or an explicit list of pixel sizes 'WxH,WxH,...', each side a positive multiple "
        "of 8. Unset: the square center crop of --resolution (diffusers' scripts). SDXL is told the original size, "
        "the crop offset and the bucket's size (its add_time_ids). Not with --cache on: latents of varying shapes "
        "(auto encodes live).", metavar="default|WxH,...")
    crops_coords_top_left_h: int | None = option(
        None, "SDXL: tell the model this crop top (pixels) instead of the crop applied, as diffusers' "
        "train_controlnet_sdxl.py (0 there: 'not cropped', which SDXL answers with centered subjects). Unset: the "
        "data's true crop offset. The pixels are cropped as before either way; other families ignore it.")
    crops_coords_top_left_w: int | None = option(
        None, "SDXL: tell the model this crop left (pixels) instead of the crop applied; see "
        "--crops_coords_top_left_h.")
    proportion_empty_prompts: float = option(
        0.0, "Fraction of captions replaced by '' during training, as in diffusers' script. The paper's 0.5 teaches "
        "the ControlNet to read the condition without a prompt (guess mode, conditions that carry the content); "
        "on the Fill task it halves what is learned in 400 steps, and on canny it lost even sampled without a prompt "
        "(bench/RESULTS.md), so it is opt-in. Its cost at 0: the ControlNet never sees the empty prompt of guidance's "
        "unconditional branch (demo, 3 seeds, step 800: circle color accuracy 0.979 against 1.000 with the paper's "
        "settings; fill IoU 0.80 reached at steps 200-300 against 600-700).")
    dataloader_num_workers: int = option(0, "Data loader worker processes; 0 loads in the main process.")
    shuffle_buffer: int = option(
        1000, "Streamed webdataset shards and --streaming: samples each loader worker holds (undecoded) to shuffle "
        "across shard boundaries; each new sample takes the place of a random one, which goes to training. Larger "
        "mixes better and costs memory (about one encoded image pair per sample) and a longer first batch; 0 or 1: "
        "shard order only. Folder layouts are shuffled whole and ignore it.")
    strict_data: bool = option(False, "Stop at the first unreadable sample instead of skipping it with a warning.")
    condition: str | None = option(
        None, "Compute the conditioning image on the fly from the target image with this extractor (e.g. canny), "
        "for datasets that have only images.")
    cache: str = option(
        "auto", "Precomputed VAE latents and text embeddings, built once and reused by every run of the same data, "
        "base and transforms: the encoders then leave the training device and every step skips them (measured "
        "1.4-2.6x faster on CPU, bench/RESULTS.md; numbers identical to live encoding). auto: on whenever the run "
        "can use one, with the disk it takes printed first, else off with a one-line notice (--random_crop, a "
        "streamed run with --condition, a cache folder that cannot be written, a disk without room). on: the same, "
        "but those cases are errors. off: encode every batch live, as diffusers' script. only: build it and exit.",
        choices=["auto", "on", "off", "only"])
    latent_cache_dir: str | None = option(
        None, "Where --cache keeps its caches, one folder per (dataset, base, resolution, transforms) key "
        "(default: $XDG_CACHE_HOME/zeroconv/latents, i.e. ~/.cache/zeroconv/latents).")
    dataset_preprocess_batch_size: int | None = option(
        None, "train_controlnet_sd3.py's flag: captions encoded this many at a time when the latent cache is built "
        "(the script's precomputed embeddings; its default is 1000, faster on a GPU). Default: --train_batch_size, the "
        "batch live encoding uses, which keeps cached and live embeddings bit-identical on the CPU.")
    # --- optimisation ------------------------------------------------------------------------------------------
    train_batch_size: int = option(4, "Batch size per device.")
    num_train_epochs: int = option(1, "Epochs to train; ignored when --max_train_steps is set.")
    max_train_steps: int | None = option(None, "Total optimizer steps; overrides --num_train_epochs.")
    gradient_accumulation_steps: int = option(1, "Batches accumulated per optimizer step (effective batch = "
                                              "batch size x accumulation x processes).")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory (slower).")
    learning_rate: float = option(5e-6, "Learning rate of the ControlNet (after warm-up).")
    scale_lr: bool = option(False, "Multiply the learning rate by processes x accumulation x batch size.")
    lr_scheduler: str = option("constant", "Learning-rate schedule.", choices=[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    lr_warmup_steps: int = option(500, "Warm-up steps of the learning-rate schedule.")
    lr_num_cycles: int = option(1, "Hard restarts of cosine_with_restarts.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")
    use_8bit_adam: bool = option(False, "8-bit AdamW from bitsandbytes (CUDA only): less optimizer memory.")
    use_adafactor: bool = option(
        False, "Adafactor (transformers') instead of AdamW, as train_controlnet_flux.py: a factored second moment, "
        "much less optimizer memory, with its options as there (fixed --learning_rate, no relative step or parameter "
        "scaling, --adam_weight_decay). Off by default: AdamW is the paper's and diffusers'.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value.")
    timestep_sampling: str | None = option(
        None, "Density of the training timesteps of a DDPM base (SD 1.x/2.x, SDXL; flow-matching bases such as SD3 "
        "draw by --weighting_scheme instead). Unset: uniform, the paper's and diffusers' (t ~ U{0..T-1}). cubic: "
        "t = (1 - u^3) T, T2I-Adapter's, half the draws above 0.875 T where the layout is decided: control comes "
        "sooner from the paper's init (Fill race, 3 seeds: fill IoU 0.811 vs 0.671 at step 200), but the low-noise "
        "steps that refine it are starved (demo, step 800: fill IoU 0.829 vs 0.871). cubic_then_uniform: cubic "
        "for the first --timestep_switch_fraction of the run, then uniform (race: 0.735 vs 0.574 at step 100, level "
        "from step 400; demo: 0.80 reached at step 150 vs 200, behind uniform from step 200 on). logit_normal: "
        "SD3's, sigmoid of N(--logit_mean, --logit_std). Figures: bench/RESULTS.md.",
        choices=["uniform", "cubic", "logit_normal", "cubic_then_uniform"])
    timestep_switch_fraction: float = option(
        0.25, "With --timestep_sampling cubic_then_uniform: the fraction of the optimizer steps (of --max_train_steps) "
        "drawn cubic before the draws turn uniform.")
    logit_mean: float = option(0.0, "Mean of the normal behind --timestep_sampling (or SD3's --weighting_scheme) "
                               "logit_normal.")
    logit_std: float = option(1.0, "Standard deviation of the normal behind --timestep_sampling (or SD3's "
                              "--weighting_scheme) logit_normal.")
    weighting_scheme: str = option(
        "logit_normal", "SD3 (flow matching): the density of the training noise levels and the loss weight, as "
        "train_controlnet_sd3.py (whose default this is). logit_normal: sigmoid of N(--logit_mean, --logit_std), "
        "weight 1; mode: --mode_scale's density, weight 1; cosmap and sigma_sqrt: uniform, weighted 2/(pi(1-2s+2s^2)) "
        "and s^-2; none: uniform, weight 1. DDPM bases use --timestep_sampling instead.",
        choices=["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"])
    mode_scale: float = option(1.29, "Scale of --weighting_scheme mode (train_controlnet_sd3.py's default 1.29).")
    precondition_outputs: bool = option(
        True, "SD3: EDM's preconditioning of the output, x = noisy - sigma * prediction, against the clean latents "
        "(train_controlnet_sd3.py's default, --precondition_outputs 1): each sample's loss weighted sigma^2 more "
        "than the plain velocity loss. 'false': the velocity target noise - latents.")
    snr_gamma: float | None = option(
        None, "Min-SNR loss weighting (Hang et al. 2023) with this gamma, 5.0 recommended: each sample's loss times "
        "min(SNR, gamma)/SNR (epsilon) or min(SNR, gamma)/(SNR+1) (v-prediction), as diffusers' scripts. Unset: "
        "every timestep counts equally, as the paper.")
    consistency_loss_weight: float = option(
        0.0, "Weight of ControlNet++'s consistency reward (0: off): the condition re-extracted, with gradients, from "
        "the one-step image of lightly noised samples, against the condition given. For the conditions with a "
        "differentiable extractor: canny, scribble, softedge, lineart (one soft-edge operator), grayscale, blur (a "
        "fixed sigma), inpaint (the known pixels; masked or rgba output), depth and segmentation (the frozen "
        "depth / segmentation model of `zeroconv prepare`, loaded in the weight dtype on the training device; "
        "segmentation's loss is cross entropy, the others' MSE); see --consistency_condition_options. Costs a VAE "
        "decode with backward for those samples, and a forward and backward through the model for depth and "
        "segmentation.")
    consistency_max_timestep: int = option(
        200, "Only samples at timesteps up to this take part in the consistency reward (ControlNet++: 200 of 1000).")
    consistency_condition: str | None = option(
        None, "The condition the consistency reward re-extracts (default: --condition): canny, scribble, softedge, "
        "lineart, grayscale, blur, inpaint, depth or segmentation. For Fill-style outlines: canny.")
    consistency_condition_options: list[str] = option(
        [], "KEY=VALUE options of the consistency reward's condition, the keys of its `zeroconv prepare` extractor "
        "(--condition_options) that the re-extraction reads; give the values the conditions were made with. blur: "
        "sigma=4.0 (pixels of the training images; sigma_max, a random strength, is refused: it cannot be "
        "re-extracted). inpaint: output=masked (the hole read as the pixels of color fill, an approximation) or "
        "rgba (the hole from the alpha: --conditioning_channels 4); output=mask is refused; fill=0. depth: "
        "model=Intel/dpt-hybrid-midas; segmentation: model=nvidia/segformer-b0-finetuned-ade-512-512 (a hub id "
        "or a local folder with its image processor). The edge conditions and grayscale take none.",
        metavar="KEY=VALUE")
    use_ema: bool = option(
        False, "Keep an exponential moving average of the ControlNet's weights; validation samples it and output_dir "
        "gets it at the end (the trained weights go to output_dir/without_ema; checkpoints hold both). Its decay "
        "warms up as min(--ema_decay, (1+n)/(10+n)) after n steps. Under FSDP each GPU averages its own shard; "
        "runs under DeepSpeed ZeRO-2, not ZeRO-3.")
    ema_decay: float = option(0.9999, "Largest decay of --use_ema's average (diffusers' EMAModel default).")
    max_nonfinite_steps: int = option(
        10, "Stop (with a checkpoint of the last good state) after this many NaN/inf steps in a row.")
    ddp_timeout: int = option(
        120, "Minutes a process waits at a collective (while the main process validates or writes a checkpoint) "
        "before the run fails (kohya's flag and unit). torch's own default is 10 to 30 minutes, which a long "
        "validation of a large base can exceed on the other GPUs.")
    mixed_precision: str = option(
        "auto", "Mixed precision: auto, no (fp32), fp16 or bf16. auto takes accelerate's setting where `accelerate "
        "launch` or its config gives one; else bf16 where the hardware has bf16 matmuls (a CUDA GPU from Ampere on; "
        "a CPU with AVX512-BF16 or AMX from --resolution 256 up, where it measured 1.6x faster per step, "
        "bench/RESULTS.md) and fp32 elsewhere. The ControlNet keeps fp32 master weights; the frozen base runs in "
        "the chosen precision. fp16 falls back to fp32 on CPU with a warning.",
        choices=["auto", "no", "fp16", "bf16"])
    allow_tf32: bool = option(False, "Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less exact).")
    enable_xformers_memory_efficient_attention: bool = option(
        False, "Use xformers attention; without xformers (or on CPU) zeroconv warns and uses PyTorch SDPA.")
    enable_npu_flash_attention: bool = option(
        False, "Flash attention on Ascend NPUs (torch_npu), as diffusers' script; elsewhere zeroconv warns and "
        "ignores it.")
    set_grads_to_none: bool = option(False, "Free gradients between steps instead of zeroing them (saves memory).")
    compile: bool = option(False, "torch.compile the ControlNet (slow first steps, faster after); falls back to "
                           "eager with a warning where compilation fails.")
    keep_freed_host_memory: bool | None = option(
        None, "Keep the host memory a training step frees for the next step, instead of glibc handing it back to "
        "the OS at each free and the next step faulting it in again as new pages (zeroconv/train/host_memory.py). "
        "Unset (the default, 'auto'): on when training on the CPU, where the tiny base's steps measured 1.0-1.3x "
        "faster in whole runs, with 2.5x fewer page faults (bench/RESULTS.md); off on a GPU, whose tensors "
        "CUDA's caching allocator keeps already. Needs glibc; elsewhere a notice and nothing changes.")
    channels_last: bool | None = option(
        None, "Keep the ControlNet and UNet weights in channels_last memory format. Unset (the default, 'auto'): "
        "each part by the grid it runs on, on from 32x32, where it measured faster on CPU (bench/RESULTS.md): all of "
        "both when the latent grid is at least 32x32 (e.g. SD at 256 px and up); on smaller latent grids, such as "
        "the tiny and toy bases at 64 px, only the ControlNet's condition encoder, which runs on the condition's "
        "pixels. The VAE keeps the default layout either way, so a latent cache matches the live VAE exactly.")
    # --- validation and logging --------------------------------------------------------------------------------
    validation_prompt: list[str] | None = option(
        None, "Prompts for validation; pair one-to-one with --validation_image, or give one for all.")
    validation_image: list[str] | None = option(
        None, "Conditioning images for validation; pair one-to-one with --validation_prompt, or give one for all.")
    validation_condition: list[str] | None = option(
        None, "Union ControlNet: the condition type (a --conditioning_image_columns column) of each "
        "--validation_image, one-to-one; it is sampled with that control_mode and its metrics are reported under "
        "validation/<type>/. Unset: every validation image is the first column's type.")
    num_validation_images: int = option(4, "Images generated per (prompt, condition) pair at each validation.")
    validation_steps: int = option(100, "Validate every N optimizer steps.")
    validation_inference_steps: int = option(20, "Denoising steps of each validation sample.")
    validation_guidance_scale: float = option(7.5, "Classifier-free guidance scale of validation samples.")
    validation_metric: str | None = option(
        None, "Controllability metric computed on every validation sample against its condition (e.g. canny, "
        "fill); written to metrics.jsonl and the tracker, so you see control being learned step by step. Default: "
        "the --condition extractor's metric when --condition is set.")
    validation_baseline: bool = option(
        True, "With a --validation_metric, also validate before the first step: the base alone (an untrained "
        "ControlNet changes nothing), the baseline the controllability curve is read against.")
    report: bool = option(
        False, "Write output_dir/report.html at every validation and at the end: the page of `zeroconv report` (a "
        "slider over the validation grids, the loss and controllability curves, the run's summary), self-contained, "
        "so it can stay open in a browser and be reloaded during training.")
    logging_dir: str = option("logs", "TensorBoard log folder, relative to output_dir.")
    report_to: str = option("tensorboard", "Tracker: tensorboard, wandb, comet_ml, all, or none.")
    tracker_project_name: str = option("train_controlnet", "Project name given to the tracker.")
    logging_steps: int = option(10, "Read the loss back from the device and log it every N steps.")
    # --- sharing -----------------------------------------------------------------------------------------------
    push_to_hub: bool = option(False, "Upload the final model and its card to the Hub (checked before training).")
    hub_token: str | None = option(None, "Hub token (default: the one saved by `huggingface-cli login`).")
    hub_model_id: str | None = option(None, "Hub repository id to push to (default: the output_dir name).")


def check_train_config(cfg: TrainConfig) -> list[tuple[str, str]]:
    """Every check of TrainConfig's fields on their own (no model, no data read), in one place so `zeroconv train`
    and `zeroconv cache` fail alike; returns the validation (image, prompt) pairs."""
    sources = [flag for flag in ("dataset_name", "train_data_dir", "jsonl_for_train") if getattr(cfg, flag)]
    if len(sources) != 1:
        which = " and ".join(f"--{flag}" for flag in sources) if sources else "none of them"
        raise UserError(f"{which} given; give exactly one of --dataset_name, --train_data_dir and --jsonl_for_train "
                        "(a local folder goes to --train_data_dir, a hub id or save_to_disk folder to "
                        "--dataset_name, a JSON-lines file of rows to --jsonl_for_train)")
    if cfg.resolution < 8 or cfg.resolution % 8:
        raise UserError(f"--resolution {cfg.resolution}: must be a positive multiple of 8 (the VAE's latent grid); "
                        f"try {max(8, cfg.resolution // 8 * 8)}")
    if cfg.dataset_preprocess_batch_size is not None and cfg.dataset_preprocess_batch_size < 1:
        raise UserError(f"--dataset_preprocess_batch_size {cfg.dataset_preprocess_batch_size}: must be at least 1, or "
                        "unset for --train_batch_size")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "logging_steps", "max_nonfinite_steps", "ddp_timeout"):
        if getattr(cfg, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if not 0.0 <= cfg.proportion_empty_prompts <= 1.0:
        raise UserError(f"--proportion_empty_prompts {cfg.proportion_empty_prompts}: must be between 0 and 1")
    if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
        raise UserError(f"--snr_gamma {cfg.snr_gamma}: must be positive (5.0 is the paper's), or unset for none")
    if cfg.consistency_loss_weight < 0:
        raise UserError(f"--consistency_loss_weight {cfg.consistency_loss_weight}: must be 0 (off) or positive")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise UserError(f"--ema_decay {cfg.ema_decay}: must be between 0 and 1 (e.g. 0.9999)")
    if not 0.0 <= cfg.timestep_switch_fraction <= 1.0:
        raise UserError(f"--timestep_switch_fraction {cfg.timestep_switch_fraction}: must be between 0 and 1 (the "
                        "fraction of --max_train_steps drawn cubic under --timestep_sampling cubic_then_uniform)")
    if cfg.logit_std <= 0:
        raise UserError(f"--logit_std {cfg.logit_std}: must be positive")
    if cfg.num_layers < 1:
        raise UserError(f"--num_layers {cfg.num_layers}: must be at least 1 (12 is diffusers' default)")
    if cfg.max_sequence_length is not None and cfg.max_sequence_length < 1:
        raise UserError(f"--max_sequence_length {cfg.max_sequence_length}: must be at least 1 (or unset: 77 for "
                        "SD3, 512 for Flux, as their example scripts)")
    for flag in ("num_double_layers", "num_single_layers"):
        if getattr(cfg, flag) < 0:
            raise UserError(f"--{flag} {getattr(cfg, flag)}: must be 0 or more (train_controlnet_flux.py's defaults "
                            "are 4 and 10)")
    if cfg.streaming and not cfg.dataset_name:
        raise UserError("--streaming streams a --dataset_name (its parquet files); webdataset shards in "
                        "--train_data_dir are streamed without it and other folders are read whole: drop --streaming")
    if cfg.shuffle_buffer < 0:
        raise UserError(f"--shuffle_buffer {cfg.shuffle_buffer}: must be 0 or more (samples per loader worker)")
    if cfg.max_train_samples is not None and cfg.max_train_samples < 1:
        raise UserError(f"--max_train_samples {cfg.max_train_samples}: must be at least 1 (or unset for all)")
    if cfg.random_crop and cfg.cache in ("on", "only"):  # auto falls back to live encoding (train/setup.py)
        raise UserError(f"--random_crop with --cache {cfg.cache}: the cache stores one crop of each image, a random "
                        "crop moves every epoch; use --cache off, or drop --random_crop")
    if cfg.aspect_buckets is not None:
        parse_aspect_buckets(cfg.aspect_buckets, cfg.resolution)
        if cfg.cache in ("on", "only"):  # auto falls back to live encoding (train/setup.py)
            raise UserError(f"--aspect_buckets with --cache {cfg.cache}: the cache stores one square crop of each "
                            "image, buckets give latents of varying shapes; use --cache off (or auto), or drop "
                            "--aspect_buckets")
    for flag in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < 0:
            raise UserError(f"--{flag} {getattr(cfg, flag)}: must be 0 or more (pixels from the top/left edge)")
    if cfg.conditioning_channels not in (1, 3, 4):
        raise UserError(f"--conditioning_channels {cfg.conditioning_channels}: must be 1, 3 or 4")
    check_union(cfg)
    pairs = validation_pairs(cfg.validation_prompt, cfg.validation_image)
    for image, _prompt in pairs:
        if not Path(image).is_file():
            raise UserError(f"--validation_image {image}: no such file")
    return pairs


def union_columns(cfg: TrainConfig) -> list[str]:
    """The condition columns of a union ControlNet (--conditioning_image_columns), in control-mode order; []
    for a plain ControlNet."""
    if not cfg.conditioning_image_columns:
        return []
    return [column.strip() for column in cfg.conditioning_image_columns.split(",")]


def union_weights(cfg: TrainConfig) -> list[float]:
    """Each condition type's normalised weight of being a sample's first type (--union_condition_weights)."""
    columns = union_columns(cfg)
    if not cfg.union_condition_weights:
        return [1.0 / len(columns)] * len(columns)
    weights = [float(w) for w in cfg.union_condition_weights.split(",")]
    return [w / sum(weights) for w in weights]


def check_union(cfg: TrainConfig) -> None:
    columns = union_columns(cfg)
    if not columns:
        for flag in ("union_condition_weights", "validation_condition"):
            if getattr(cfg, flag):
                raise UserError(f"--{flag} is for a union ControlNet; give its condition columns with "
                                "--conditioning_image_columns, or drop it")
        return
    flag = f"--conditioning_image_columns {cfg.conditioning_image_columns}"
    if any(not column for column in columns) or len(set(columns)) != len(columns):
        raise UserError(f"{flag}: every column once, comma-separated without empty names (e.g. depth,canny)")
    if len(columns) < 2:
        raise UserError(f"{flag}: a union ControlNet of one condition type is a plain one; give two columns or "
                        "more, or use --conditioning_image_column")
    for other, why in (("condition", cfg.condition), ("consistency_loss_weight", cfg.consistency_loss_weight)):
        if why:
            raise UserError(f"{flag} with --{other}: not supported for union ControlNets yet; the conditions come "
                            f"from the dataset's columns; drop --{other}")
    if cfg.cache in ("on", "only"):
        raise UserError(f"{flag} with --cache {cfg.cache}: the latent cache holds one condition per image; use "
                        "--cache auto (which encodes a union run live) or off")
    if cfg.union_condition_weights:
        try:
            weights = [float(w) for w in cfg.union_condition_weights.split(",")]
        except ValueError:
            weights = []
        if len(weights) != len(columns) or any(w < 0 for w in weights) or not sum(weights) > 0:
            raise UserError(f"--union_condition_weights {cfg.union_condition_weights}: give {len(columns)} numbers "
                            f"of 0 or more, not all 0, comma-separated, one per column of {flag}")
    if not 0.0 <= cfg.union_extra_condition_probability <= 1.0:
        raise UserError(f"--union_extra_condition_probability {cfg.union_extra_condition_probability}: must be "
                        "between 0 and 1")
    for name in cfg.validation_condition or []:
        if name not in columns:
            raise UserError(f"--validation_condition {name}: not one of the condition columns ({', '.join(columns)})")
    if cfg.validation_condition and len(cfg.validation_condition) != len(cfg.validation_image or []):
        raise UserError(f"--validation_condition: {len(cfg.validation_condition)} types for "
                        f"{len(cfg.validation_image or [])} --validation_image; give one type per image")


def validation_condition_types(cfg: TrainConfig) -> list[str]:
    """The condition type (a --conditioning_image_columns column) of each validation pair, in validation_pairs'
    order: the type of its --validation_image (--validation_condition; the first column where unset). [] for a
    plain ControlNet."""
    columns = union_columns(cfg)
    if not columns:
        return []
    images = cfg.validation_image or []
    types = cfg.validation_condition or [columns[0]] * len(images)
    pairs = validation_pairs(cfg.validation_prompt, cfg.validation_image)
    return [types[0]] * len(pairs) if len(images) == 1 else list(types[:len(pairs)])
