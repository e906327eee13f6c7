"""A CLIP BPE tokenizer generated offline: byte-level alphabet plus whole-word merges for a word list.

The tiny test bases and the toy base need a real `CLIPTokenizer` (the pipelines and the training code use it
exactly as they use SD's) without downloading `openai/clip-vit-large-patch14`. Every byte has a token, so any
text tokenizes; the words passed in become single tokens through a chain of merges (r+e, re+d</w>, ...).
`write_t5_tokenizer` does the same for the T5 tokenizer of the SD3 and Flux bases.
"""

from __future__ import annotations

import json
from pathlib import Path



def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _merge_chain(word: str) -> list[tuple[str, str]]:
    """Merges that build `word</w>` left to right from single characters."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, current = [], symbols[0]
    for nxt in symbols[1:]:
        merges.append((current, nxt))
        current = current + nxt
    return merges


def write_clip_tokenizer(out_dir: str | Path, words: list[str] = (), model_max_length: int = 77):
    """Write vocab.json/merges.txt/tokenizer_config.json for a CLIPTokenizer; returns the loaded tokenizer."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if len(w) > 1}):
        for pair in _merge_chain(word):
            if pair not in merges:
                merges.append(pair)
                vocab_tokens.append(pair[0] + pair[1])
    vocab_tokens += [BOS, EOS]
    vocab = {}
    for tok in vocab_tokens:
        vocab.setdefault(tok, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    return CLIPTokenizer.from_pretrained(out_dir)


def write_t5_tokenizer(out_dir: str | Path, words: list[str]):
    """A T5TokenizerFast generated offline: a unigram model whose pieces are "▁word" for `words`, "▁", and
    single characters (so any lowercase text tokenizes), ids pad 0, </s> 1, <unk> 2 as T5's; the tokenizer appends
    </s> as T5's does. Saved as tokenizer.json (no sentencepiece model needed)."""
    from string import ascii_lowercase, digits

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    pieces += [("▁", -2.0)] + [(c, -5.0) for c in ascii_lowercase + digits + ".,"]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    tokenizer.save_pretrained(out_dir)
    return T5TokenizerFast.from_pretrained(out_dir)
