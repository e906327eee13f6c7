"""Loading the frozen base: a diffusers folder, a hub id, a single .ckpt/.safetensors file, or 'toy'.

What is loaded, and how, is the base's model family's (zeroconv.models.families), found from the base itself.
"""

from __future__ import annotations

from zeroconv.models.locate import check_base_arg, resolve_base  # noqa: F401 - callers import them here
from zeroconv.models.parts import Base, Deferred


def load_base(name: str, revision: str | None = None, variant: str | None = None, cache_dir: str | None = None,
              tokenizer_name: str | None = None, dtype=None, vae: str | None = None,
              defer_text_encoders: bool = False) -> Base:
    """The base's frozen parts; with `dtype` (a torch dtype) their weights are loaded in it. Sampling loads in its
    dtype rather than casting after: diffusers warns on every `.to(dtype)` of a model (zeroconv.models.pipeline).
    `vae` (--pretrained_vae_model_name_or_path) replaces the base's VAE by that one. With `defer_text_encoders`
    the text encoders of a diffusers folder or hub id are `Deferred` (config only) until `base.materialize()`:
    a run that a complete latent cache serves needs none of them for its steps."""
    from zeroconv.models.families import detect

    check_base_arg(name, revision=revision, cache_dir=cache_dir)
    location = resolve_base(name)
    family = detect(location, name, revision=revision, cache_dir=cache_dir)
    base = family.load_base(location, name, revision=revision, variant=variant, cache_dir=cache_dir,
                            tokenizer_name=tokenizer_name, dtype=dtype, defer_text_encoders=defer_text_encoders)
    if vae is not None:
        base.vae = load_vae(vae, cache_dir=cache_dir, dtype=dtype)
    for module in (*family.frozen_encoders(base), base.unet):
        if not isinstance(module, Deferred):  # a Deferred one is frozen when it loads
            module.requires_grad_(False)
            module.eval()
    return base


def load_denoiser(name: str, revision: str | None = None, tokenizer_name: str | None = None,
                  prediction_type: str | None = None, flag: str = "--base") -> Base:
    """The base's denoiser and VAE without its text encoders (Base.tokenizer and .text_encoder are None): what
    `zeroconv init` builds a ControlNet from."""
    from zeroconv.models.families import detect

    check_base_arg(name, flag=flag, revision=revision)
    location = resolve_base(name)
    family = detect(location, name, revision=revision, flag=flag)
    return family.load_denoiser(location, name, revision=revision, tokenizer_name=tokenizer_name,
                                prediction_type=prediction_type)


def load_vae(name: str, cache_dir: str | None = None, dtype=None):
    """An AutoencoderKL from a folder (its own, or a pipeline's with vae/ inside) or a hub id, as diffusers'
    train_controlnet_sdxl.py loads --pretrained_vae_model_name_or_path. The base's --revision and --variant are
    not passed on: they name the base's files, and a standalone VAE such as madebyollin/sdxl-vae-fp16-fix has
    neither."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    from zeroconv.errors import UserError

    subfolder = "vae" if (Path(name) / "vae" / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(name, subfolder=subfolder, cache_dir=cache_dir, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"--pretrained_vae_model_name_or_path {name}: no VAE could be loaded there "
                        f"({str(exc).splitlines()[0]}); give a folder with the VAE's config.json and weights, or a "
                        "hub id such as madebyollin/sdxl-vae-fp16-fix") from None
