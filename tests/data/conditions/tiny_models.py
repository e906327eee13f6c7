"""Tiny random transformers models saved with their processors, built in code: depth (DPT), semantic
segmentation (Segformer) and an image-to-text captioner (BLIP). Wiring checks only; the outputs are noise."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "face", "red", "blue", "circle", "with", "background", "smiling", "man", "woman"]


def tiny_depth_model(out: Path, size: int = 32) -> Path:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       image_size=size, patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
                       backbone_out_indices=[0, 1, 2, 3], head_in_index=-1, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).eval().save_pretrained(out)
    DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=False).save_pretrained(out)
    return out


def tiny_segmentation_model(out: Path, num_labels: int = 5, size: int = 32) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=16, num_labels=num_labels,
                             id2label={i: f"class{i}" for i in range(num_labels)},
                             label2id={f"class{i}": i for i in range(num_labels)})
    SegformerForSemanticSegmentation(config).eval().save_pretrained(out)
    SegformerImageProcessor(size={"height": size, "width": size}).save_pretrained(out)
    return out


def tiny_captioner(out: Path, size: int = 32) -> Path:
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                              BlipProcessor)

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(0)
    text = {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": 5, "pad_token_id": 0,
            "sep_token_id": 3, "eos_token_id": 3}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": size, "patch_size": 8}
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    BlipForConditionalGeneration(config).eval().save_pretrained(out)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    processor.save_pretrained(out)
    return out
