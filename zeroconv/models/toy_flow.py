"""Toy SD3 and Flux bases: the toy base's autoencoder and CLIP text encoder behind a small flow-matching
transformer trained here, on the toy base's own shapes, in CPU minutes.

A random transformer gives a ControlNet nothing to steer (it learns to denoise for the random network and never
reads the condition), so checks that a ControlNet learns control (bench/control_learned.py) need a base that
denoises. These are zeroconv's SD3 and Flux families in miniature, in diffusers layout (load_base and
StableDiffusion3Pipeline / FluxPipeline load them):

- VAE: the toy base's (4 latent channels, 4x down: 64 px images, 16x16 latents), with SD3's convention of a
  shift_factor: shift and scale make the training latents zero-mean and unit-variance.
- Text: SD3 reads the toy CLIP twice (CLIP-L and CLIP-G slots, each with a seeded random projection for its pooled
  embedding) and no T5 (zero embeddings, as SD3 allows); Flux reads the toy CLIP's pooled output and a tiny
  random T5 (frozen and deterministic, it still tells the captions apart). All frozen.
- Transformer: patch 2 (SD3) or the 2x2 packing (Flux) on 16x16 latents, 64 image tokens, width 64.
- Training: the family's own step (noisy_batch and denoise, controlnet None), so the base learns exactly the
  sigmas, velocity target and loss weights a ControlNet then trains with (diffusers' SD3 script's defaults:
  logit-normal sigmas, preconditioned weights); AdamW with warm-up and cosine decay, an EMA of the weights saved.
  By default 1,200 steps of batch 16 on 2,000 images: 12 (SD3) and 15 (Flux) minutes on one shared CPU thread.
  Far from a finished model (after 400 steps they drew the prompted colors as blobs, not shapes), but a denoiser a
  ControlNet can steer: with the true outlines its held-out loss is about half the shuffled one (bench/RESULTS.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

# T5 tokens of a prompt (the runs' --max_sequence_length): the toy captions are six words
TEXT_TOKENS = 16
FAMILIES = ("sd3", "flux")


def clip_with_projection(text_encoder, seed: int):
    """The toy CLIP as the CLIPTextModelWithProjection SD3 reads: its trained weights, and a seeded random
    projection for the pooled embedding (the toy never had one)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(text_encoder.config)
    model.text_model.load_state_dict(text_encoder.state_dict())
    return model.eval()


def tiny_t5(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def build_parts(family_name: str, out: Path, seed: int):
    """(pipeline class, its modules but the scheduler, scheduler) of a toy `family_name` base, untrained."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    from zeroconv.models.tokenizer import write_t5_tokenizer
    from zeroconv.models.toy_base import toy_base_path, vocabulary

    toy = StableDiffusionPipeline.from_pretrained(toy_base_path())
    width = toy.text_encoder.config.hidden_size
    torch.manual_seed(seed)
    if family_name == "sd3":
        modules = dict(vae=toy.vae, text_encoder=clip_with_projection(toy.text_encoder, seed),
                       tokenizer=toy.tokenizer, text_encoder_2=clip_with_projection(toy.text_encoder, seed + 1),
                       tokenizer_2=toy.tokenizer, text_encoder_3=None, tokenizer_3=None)
        # the CLIPs' penultimate states side by side (2 x 64), their projections pooled (2 x 64)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=2 * width, caption_projection_dim=64,
            pooled_projection_dim=2 * toy.text_encoder.config.projection_dim, pos_embed_max_size=16)
        # a constant shift of 1: SD3's 3.0 is for 1024 px (4096 tokens), these images have 64
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        return diffusers.StableDiffusion3Pipeline, dict(transformer=transformer, **modules), scheduler
    tokenizer_2 = write_t5_tokenizer(out / "tokenizer_2", vocabulary())
    text_encoder_2 = tiny_t5(len(tokenizer_2), seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=width,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    # FLUX.1's config: training draws unshifted sigmas, sampling shifts them by the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    modules = dict(vae=toy.vae, text_encoder=toy.text_encoder.eval(), tokenizer=toy.tokenizer,
                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    return diffusers.FluxPipeline, dict(transformer=transformer, **modules), scheduler


def make_toy_flow_base(out: str | Path, family_name: str, steps: int = 1200, batch_size: int = 16,
                       learning_rate: float = 2e-3, num_images: int = 2000, seed: int = 0) -> Path:
    """Train a toy `family_name` ("sd3" or "flux") base into `out` as the module docstring says; returns `out`.
    The training seconds are written to `out`/toy_flow.json."""
    import json

    from tqdm.auto import tqdm

    from zeroconv.models.families import get_family
    from zeroconv.models.latents import sample_latents
    from zeroconv.models.noise import NoiseRecipe
    from zeroconv.models.parts import Base
    from zeroconv.models.toy_base import WeightAverage, descend, draw_training_set, encode_all, warmup_cosine

    started = time.perf_counter()
    out = Path(out)
    pipeline_class, modules, scheduler = build_parts(family_name, out, seed)
    images, captions = draw_training_set(num_images, seed)
    vae = modules["vae"]
    with torch.no_grad():
        means, stds = encode_all(vae, images)
    # SD3's convention, (z - shift) * scale: the training latents zero-mean and unit-variance
    shift, scale = float(means.mean()), float(1.0 / means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    transformer = modules["transformer"]
    base = Base(modules["tokenizer"], modules["text_encoder"], vae, transformer, scheduler, get_family(family_name),
                tokenizer_2=modules["tokenizer_2"], text_encoder_2=modules["text_encoder_2"],
                max_sequence_length=TEXT_TOKENS)
    with torch.no_grad():
        prompts = base.family.encode_prompts(base, captions, "cpu")

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=learning_rate, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, steps)
    average = WeightAverage(transformer.parameters(), decay=0.999)
    transformer.train()
    bar = tqdm(range(steps), desc=f"train toy {family_name} transformer", dynamic_ncols=True)
    for step in bar:
        index = torch.randint(0, num_images, (batch_size,), generator=generator)
        latents = sample_latents(means[index], stds[index], generator, scale, shift)
        noisy, timesteps, target, weights = base.family.noisy_batch(scheduler, latents, generator, NoiseRecipe())
        pred = base.family.denoise(transformer, None, noisy, timesteps,
                                   {name: value[index] for name, value in prompts.items()}, None)
        per_sample = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        descend((per_sample * weights).mean(), transformer.parameters(), optimizer, schedule, average, step, bar)
    average.copy_to_model()
    transformer.eval()
    pipeline_class(scheduler=scheduler, **modules).save_pretrained(out, safe_serialization=True)
    (out / "toy_flow.json").write_text(json.dumps({
        "family": family_name, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
        "num_images": num_images, "seed": seed, "max_sequence_length": TEXT_TOKENS,
        "seconds": round(time.perf_counter() - started, 1)}))
    return out
