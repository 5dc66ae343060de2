"""Qwen3 and Qwen3-MoE: the Llama decoder with per-head QK-norm (no q/k/v bias)."""

from __future__ import annotations

from typing import Any

from kvforge.config import TransformerConfig
from kvforge.models import llama
from kvforge.models.registry import ModelFamily


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """Qwen3 / Qwen3-MoE config.json."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return llama.config_from_hf(hf, qk_norm=True, sliding_window=window, sliding_layers=())


def config_from_gguf(meta: dict[str, Any]) -> TransformerConfig:
    """qwen3 / qwen3moe GGUF metadata."""
    return llama.config_from_gguf(meta, qk_norm=True)


FAMILY = ModelFamily(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
    gguf_architectures=("qwen3", "qwen3moe"),
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
)
