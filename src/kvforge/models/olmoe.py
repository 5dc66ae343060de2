"""OLMoE: the Llama decoder with QK-norm over all heads at once, optional q/k/v clamping, and
64 experts (8 active) without renormalised routing weights."""

from __future__ import annotations

from typing import Any

from kvforge.config import TransformerConfig
from kvforge.models import llama
from kvforge.models.registry import ModelFamily


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """OLMoE config.json."""
    return llama.config_from_hf(hf, qk_norm=True, qk_norm_full=True, clip_qkv=hf.get("clip_qkv"))


def config_from_gguf(meta: dict[str, Any]) -> TransformerConfig:
    """olmoe GGUF metadata."""
    clip = meta.get("olmoe.attention.clamp_kqv")
    return llama.config_from_gguf(meta, qk_norm=True, qk_norm_full=True, clip_qkv=clip)


FAMILY = ModelFamily(
    name="olmoe",
    hf_architectures=("OlmoeForCausalLM",),
    gguf_architectures=("olmoe",),
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
)
