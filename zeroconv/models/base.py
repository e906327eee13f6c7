"""Loading the frozen base: a diffusers folder, a hub id, a single .ckpt/.safetensors file, or 'toy'.

What is loaded, and how, is the base's model family's (zeroconv.models.families), found from the base itself.
"""

from __future__ import annotations

from zeroconv.models.locate import check_base_arg, resolve_base  # noqa: F401 - callers import them here
from zeroconv.models.parts import Base


def load_base(name: str, revision: str | None = None, variant: str | None = None, cache_dir: str | None = None,
              tokenizer_name: str | None = None, dtype=None) -> Base:
    """The base's frozen parts; with `dtype` (a torch dtype) their weights are loaded in it. Sampling loads in its
    dtype rather than casting after: diffusers warns on every `.to(dtype)` of a model (zeroconv.models.pipeline)."""
    from zeroconv.models.families import detect

    check_base_arg(name, revision=revision, cache_dir=cache_dir)
    location = resolve_base(name)
    family = detect(location, name, revision=revision, cache_dir=cache_dir)
    base = family.load_base(location, name, revision=revision, variant=variant, cache_dir=cache_dir,
                            tokenizer_name=tokenizer_name, dtype=dtype)
    for module in (*family.frozen_encoders(base), base.unet):
        module.requires_grad_(False)
        module.eval()
    return base
