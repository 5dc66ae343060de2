"""Qwen2 and Qwen2-MoE: the Llama decoder with biases on q/k/v (the MoE with a gated shared
expert)."""

from __future__ import annotations

from typing import Any

from kvforge.config import TransformerConfig
from kvforge.models import llama
from kvforge.models.registry import ModelFamily


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """Qwen2 config.json: always q/k/v bias; sliding window only when enabled."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return llama.config_from_hf(hf, qkv_bias=True, sliding_window=window, sliding_layers=())


def config_from_gguf(meta: dict[str, Any]) -> TransformerConfig:
    """Qwen2 GGUF metadata."""
    return llama.config_from_gguf(meta, qkv_bias=True)


FAMILY = ModelFamily(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"),
    gguf_architectures=("qwen2", "qwen2moe"),
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
)
