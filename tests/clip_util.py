"""Tiny CLIP checkpoints written by transformers, with a word-level tokenizer.json."""

from __future__ import annotations

from pathlib import Path

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "triangle",
    "small",
    "big",
    "left",
    "right",
]


def write_tokenizer(folder: Path, words: list[str]) -> dict[str, int]:
    """kvforge's training tokenizer over ``words``: [PAD] 0, [UNK] 1, [SOS] 2, [EOS] 3, then
    the words; every text becomes [SOS] words [EOS]."""
    from kvforge.clip.train import build_tokenizer

    return dict(build_tokenizer([" ".join(words)], folder).get_vocab())


def write_tiny_clip(folder: Path, hidden_act: str = "quick_gelu", seed: int = 0) -> Path:
    """A random ``CLIPModel`` (2 layers per tower, 32x32 images in 8x8 patches) saved as an HF
    directory with safetensors and a tokenizer.json."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vocab = write_tokenizer(folder, WORDS)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "eos_token_id": 3,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "hidden_act": hidden_act,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": hidden_act,
        },
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():  # layer norms away from 1/0 so that a missed one shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder
