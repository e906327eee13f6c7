"""Tiny, seeded, offline SD bases for tests: a complete diffusers folder built in code in about a second.

`make_tiny_base(dir, prediction_type="epsilon"|"v_prediction", flavor="sd15"|"sd21")` writes
unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json; StableDiffusionPipeline
.from_pretrained(dir) loads it. `make_tiny_sdxl_base(dir)` writes an SDXL one (two text encoders and
tokenizers, a "text_time" UNet) that StableDiffusionXLPipeline loads; `make_tiny_sd3_base(dir, t5=True)` an SD3 one
(CLIP-L, CLIP-G, optionally T5, a 16-channel VAE with a shift, an SD3Transformer2DModel, a flow-matching scheduler)
that StableDiffusion3Pipeline loads. The shapes follow SD (4 latent channels, VAE downsampling 8x, cross
attention on a CLIP text encoder), only narrow: the code paths are SD's, the cost is not.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_WORDS = ["red", "green", "blue", "circle", "square", "background", "with", "a", "photo", "of"]


def tiny_unet(flavor: str = "sd15", sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    sd21 = flavor == "sd21"
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        # attention on the coarser level only: at 512 px a full-resolution attention would cost most of a test
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd21 else 4,
        use_linear_projection=sd21,
        norm_num_groups=8,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    # Four blocks = three 2x downsamplings: the 8x latent grid of SD, so the ControlNet's condition encoder
    # keeps its SD shape too.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def tiny_text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=32,
    )
    return CLIPTextModel(config)


def sd_scheduler(prediction_type: str = "epsilon"):
    from diffusers import PNDMScheduler

    # SD 1.x/2.x ship a PNDM scheduler config; training reads it as DDPM, sampling swaps in another.
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def make_tiny_base(out_dir: str | Path, prediction_type: str = "epsilon", flavor: str = "sd15", seed: int = 0) -> Path:
    """Write a complete tiny SD base (diffusers layout) to `out_dir`; returns the path."""
    from diffusers import StableDiffusionPipeline

    from zeroconv.models.tokenizer import write_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", TINY_WORDS)
    text_encoder = tiny_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(flavor),
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def tiny_sdxl_unet(sample_size: int = 8):
    """SDXL's UNet shape, narrow: "text_time" add-embedding of 6 size/crop ids (8 channels each) plus the second
    text encoder's 40-wide pooled embedding, cross-attention on both encoders' 32 + 48 channels, and SDXL's deeper
    transformer stacks on the coarser level (transformer_layers_per_block 1, 2), as diffusers' own SDXL tests.
    The two encoders differ in width as SDXL's do (768, 1280): diffusers tells them apart in a single file by it."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 40,
        cross_attention_dim=32 + 48,
        norm_num_groups=8,
    )


def tiny_text_encoder_2(vocab_size: int, bos: int, eos: int, hidden_size: int = 32, projection_dim: int = 32):
    """The second text encoder: a CLIPTextModelWithProjection, whose projected embedding SDXL pools."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = tiny_text_encoder(vocab_size, bos, eos).config
    return CLIPTextModelWithProjection(CLIPTextConfig(**{**config.to_dict(), "hidden_size": hidden_size,
                                                         "intermediate_size": 2 * hidden_size,
                                                         "projection_dim": projection_dim}))


def make_tiny_sdxl_base(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny SDXL base (diffusers layout: tokenizer(_2), text_encoder(_2), vae, unet, scheduler)
    to `out_dir`; StableDiffusionXLPipeline and StableDiffusionXLControlNetPipeline load it offline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from zeroconv.models.tokenizer import write_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", TINY_WORDS)
    tokenizer_2 = write_clip_tokenizer(out_dir / "tokenizer_2", TINY_WORDS)
    ids = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    # SDXL ships an Euler scheduler with SD's betas and "leading" spacing
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),  # force_upcast true, as SDXL's VAE
        text_encoder=tiny_text_encoder(*ids),
        text_encoder_2=tiny_text_encoder_2(*ids, hidden_size=48, projection_dim=40),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(),
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def make_toy_sdxl_base(out_dir: str | Path, seed: int = 0) -> Path:
    """The shipped toy base (a trained 64 px denoiser) dressed as SDXL, for checks that need a UNet which denoises:
    a random tiny SDXL UNet gives a ControlNet nothing to steer, and no condition is learned in CPU minutes.

    The toy UNet's weights in an SDXL UNet config: the "text_time" add-embedding (size/crop ids and the pooled
    embedding) with a zero output layer, so it adds nothing to the time embedding; cross-attention widened by a
    second text encoder's 48 channels, whose key/value weights are zero, so the UNet reads the first encoder's
    states only (SDXL takes their penultimate layer, where the toy was trained on the last). The second encoder is
    a random CLIP with a 40-wide projection; VAE and tokenizer are the toy's, the scheduler SDXL's Euler config.
    Everything SDXL adds runs; the denoising is the toy's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from zeroconv.models.toy_base import toy_base_path

    toy = StableDiffusionPipeline.from_pretrained(toy_base_path())
    width, extra, pooled, time_dim = toy.text_encoder.config.hidden_size, 48, 40, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**toy.unet.config, "addition_embed_type": "text_time",
                                             "addition_time_embed_dim": time_dim, "cross_attention_dim": width + extra,
                                             "projection_class_embeddings_input_dim": 6 * time_dim + pooled})
    trained = toy.unet.state_dict()
    state = unet.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("add_embedding.linear_2."):
                value.zero_()
            elif key.startswith("add_embedding."):
                continue  # seeded random: its output is multiplied by the zero layer after it
            elif key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                value.zero_()
                value[:, :width] = trained[key]
            else:
                value.copy_(trained[key])
    unet.load_state_dict(state)
    bos, eos = toy.tokenizer.bos_token_id, toy.tokenizer.eos_token_id
    text_encoder_2 = tiny_text_encoder_2(len(toy.tokenizer), bos, eos, hidden_size=extra, projection_dim=pooled)
    text_encoder_2 = type(text_encoder_2)(type(text_encoder_2.config)(**{
        **text_encoder_2.config.to_dict(), "max_position_embeddings": toy.tokenizer.model_max_length}))
    scheduler = EulerDiscreteScheduler.from_config({**toy.scheduler.config, "timestep_spacing": "leading"})
    pipe = StableDiffusionXLPipeline(vae=toy.vae, text_encoder=toy.text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=toy.tokenizer, tokenizer_2=toy.tokenizer, unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def write_sdxl_single_file(base_dir: str | Path, path: str | Path) -> Path:
    """A diffusers SDXL folder as one original-layout .safetensors (the layout of sd_xl_base_1.0.safetensors)."""
    from diffusers import StableDiffusionXLPipeline

    from zeroconv.models.formats import sdxl_to_original
    from zeroconv.models.single_file import save_aligned

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    return save_aligned(sdxl_to_original(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2), path,
                        {"format": "pt"})


def tiny_sd3_vae():
    """SD3's VAE shape, narrow: 16 latent channels, no quant convs, SD3's shift and scale, 8x downsampling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=64,
                         shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_transformer(sample_size: int = 8):
    """SD3's transformer, narrow: patch 2 on the 16-channel latents, 2 joint blocks of 4 heads x 8, text of
    64 channels (the CLIPs' 32 + 32 side by side, T5's width), pooled 32 + 32; positions for up to 128 px."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                 caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                                 pos_embed_max_size=16)


def make_tiny_sd3_base(out_dir: str | Path, t5: bool = True, seed: int = 0) -> Path:
    """Write a complete tiny SD3 base (diffusers layout: tokenizer(_2, _3), text_encoder(_2, _3), vae, transformer,
    scheduler) to `out_dir`; without `t5`, no text_encoder_3/tokenizer_3 (SD3's pipeline then uses zero T5
    embeddings). StableDiffusion3Pipeline and StableDiffusion3ControlNetPipeline load it offline (without T5 given
    text_encoder_3=None, tokenizer_3=None, as diffusers documents for SD3 without T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from zeroconv.models.tokenizer import write_clip_tokenizer, write_t5_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", TINY_WORDS)
    tokenizer_2 = write_clip_tokenizer(out_dir / "tokenizer_2", TINY_WORDS)
    ids = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    tokenizer_3 = text_encoder_3 = None
    if t5:
        tokenizer_3 = write_t5_tokenizer(out_dir / "tokenizer_3", TINY_WORDS)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_ff=128, d_kv=16,
                                                 num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD3's
        vae=tiny_sd3_vae(),
        text_encoder=tiny_text_encoder_2(*ids),  # CLIP-L with its projection, as SD3 ships it
        tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder_2(*ids),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def tiny_flux_transformer(guidance_embeds: bool = False):
    """Flux's transformer, narrow: the 16-channel latents packed 2x2 (64 inputs), 2 double-stream and 2
    single-stream blocks of 2 heads x 8 (rotary axes 2 + 2 + 4), T5's 64-wide states, CLIP's 32-wide pooled
    embedding; with `guidance_embeds`, FLUX.1-dev's guidance embedding."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                  pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))


def make_tiny_flux_base(out_dir: str | Path, guidance_embeds: bool = False, seed: int = 0) -> Path:
    """Write a complete tiny Flux base (diffusers layout: tokenizer (CLIP), tokenizer_2 (T5), text_encoder(_2),
    vae, transformer, scheduler) to `out_dir`; FluxPipeline and FluxControlNetPipeline load it offline. The
    scheduler is FLUX.1's config (dynamic shifting); the VAE SD3's shape (16 channels, shift and scale)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5Config, T5EncoderModel

    from zeroconv.models.tokenizer import write_clip_tokenizer, write_t5_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", TINY_WORDS)
    tokenizer_2 = write_t5_tokenizer(out_dir / "tokenizer_2", TINY_WORDS)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=64, d_ff=128, d_kv=16,
                                             num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_sd3_vae(), text_encoder=tiny_text_encoder(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=tiny_flux_transformer(guidance_embeds))
    pipe.save_pretrained(out_dir)
    return out_dir


def make_image_dataset(out_dir: str | Path, n: int = 8, size: int = 64, layout: str = "imagefolder", seed: int = 0) -> Path:
    """Write `n` (image, condition, caption) triples of colored squares in one of the supported layouts.

    layout: "imagefolder" (metadata.jsonl), "fill50k" (prompt.json), "kohya" (images/ + conditioning/ + .txt)."""
    import json

    import numpy as np
    from PIL import Image

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = []
    for i in range(n):
        name = list(colors)[i % 3]
        x0, y0 = rng.integers(0, size // 2, 2)
        w = int(rng.integers(size // 4, size // 2))
        img = np.full((size, size, 3), 240, np.uint8)
        img[y0:y0 + w, x0:x0 + w] = colors[name]
        cond = np.zeros((size, size, 3), np.uint8)
        cond[y0:y0 + w, x0:x0 + w] = 255
        rows.append((f"{i:04d}.png", Image.fromarray(img), Image.fromarray(cond), f"a {name} square"))
    if layout == "imagefolder":
        (out_dir / "conditioning").mkdir(parents=True, exist_ok=True)
        with open(out_dir / "metadata.jsonl", "w") as fh:
            for fname, img, cond, text in rows:
                img.save(out_dir / fname)
                cond.save(out_dir / "conditioning" / fname)
                fh.write(json.dumps({"file_name": fname, "conditioning_image_file_name": f"conditioning/{fname}",
                                     "text": text}) + "\n")
    elif layout == "fill50k":
        (out_dir / "source").mkdir(parents=True, exist_ok=True)
        (out_dir / "target").mkdir(parents=True, exist_ok=True)
        with open(out_dir / "prompt.json", "w") as fh:
            for fname, img, cond, text in rows:
                img.save(out_dir / "target" / fname)
                cond.save(out_dir / "source" / fname)
                fh.write(json.dumps({"source": f"source/{fname}", "target": f"target/{fname}", "prompt": text}) + "\n")
    elif layout == "kohya":
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        (out_dir / "conditioning").mkdir(parents=True, exist_ok=True)
        for fname, img, cond, text in rows:
            img.save(out_dir / "images" / fname)
            (out_dir / "images" / fname).with_suffix(".txt").write_text(text)
            cond.save(out_dir / "conditioning" / fname)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return out_dir


def make_union_dataset(out_dir: str | Path, n: int = 8, size: int = 64, columns: tuple[str, ...] = ("mask", "outline"),
                       seed: int = 0) -> Path:
    """An imagefolder dataset with one condition column per name in `columns` (metadata.jsonl keys
    <name>_file_name): make_image_dataset's squares, whose conditions are the filled square ("mask") and its
    outline ("outline"; any further name gets the square's inverse)."""
    import json

    import numpy as np
    from PIL import Image

    out_dir = Path(make_image_dataset(out_dir, n=n, size=size, layout="imagefolder", seed=seed))
    rows = [json.loads(line) for line in (out_dir / "metadata.jsonl").read_text().splitlines()]
    for column in columns:
        (out_dir / column).mkdir(exist_ok=True)
    for row in rows:
        mask = np.asarray(Image.open(out_dir / row.pop("conditioning_image_file_name")).convert("L")) > 127
        inner = np.zeros_like(mask)
        inner[1:-1, 1:-1] = mask[2:, 1:-1] & mask[:-2, 1:-1] & mask[1:-1, 2:] & mask[1:-1, :-2] & mask[1:-1, 1:-1]
        drawn = {"mask": mask, "outline": mask & ~inner}
        for column in columns:
            pixels = drawn.get(column, ~mask)
            Image.fromarray((pixels * 255).astype(np.uint8)).convert("RGB").save(out_dir / column / row["file_name"])
            row[f"{column}_file_name"] = f"{column}/{row['file_name']}"
    (out_dir / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out_dir
