"""Gemma 3 (text): sandwich norms, QK-norm, GeGLU, scaled embeddings, 5:1 local:global layers."""

from __future__ import annotations

from typing import Any

import torch

from kvforge.config import TransformerConfig
from kvforge.models import llama
from kvforge.models.common import gemma_embed_scale
from kvforge.models.registry import ModelFamily

_PATTERN = 6  # every sixth layer attends globally, the rest within the sliding window
_LOCAL_ROPE_THETA = 10000.0


def _sliding_layers(num_layers: int, layer_types: list[str] | None = None) -> tuple[bool, ...]:
    if layer_types:
        return tuple(t == "sliding_attention" for t in layer_types)
    return tuple((i + 1) % _PATTERN != 0 for i in range(num_layers))


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """Gemma3 text config.json."""
    hf = hf.get("text_config", hf)
    num_layers = hf["num_hidden_layers"]
    # Newer configs hold one rope entry per layer type; older ones flat fields.
    ropes = hf.get("rope_parameters") or {}
    full, local = ropes.get("full_attention", {}), ropes.get("sliding_attention", {})
    scaling = full if full.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    base = llama.config_from_hf(
        hf,
        architecture="Gemma3ForCausalLM",
        rope_theta=float(full.get("rope_theta") or hf.get("rope_theta") or 1_000_000.0),
        rope_scaling=dict(scaling) if scaling else None,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )
    local_theta = local.get("rope_theta") or hf.get("rope_local_base_freq") or _LOCAL_ROPE_THETA
    return TransformerConfig(
        **{
            **base.__dict__,
            "qk_norm": True,
            "sandwich_norm": True,
            "hidden_act": "gelu_tanh",
            "embed_scale": gemma_embed_scale(hf["hidden_size"]),
            "attn_scale": float(hf.get("query_pre_attn_scalar", base.head_dim)) ** -0.5,
            "rope_local_theta": float(local_theta),
            "sliding_window": hf.get("sliding_window", 512),
            "sliding_layers": _sliding_layers(num_layers, hf.get("layer_types")),
            "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
            "final_logit_softcap": hf.get("final_logit_softcapping"),
        }
    )


def config_from_gguf(meta: dict[str, Any]) -> TransformerConfig:
    """Gemma3 GGUF metadata (norm weights there already hold 1 + w)."""
    base = llama.config_from_gguf(meta, tie_word_embeddings=True)
    return TransformerConfig(
        **{
            **base.__dict__,
            "qk_norm": True,
            "sandwich_norm": True,
            "hidden_act": "gelu_tanh",
            "embed_scale": gemma_embed_scale(base.hidden_size),
            "attn_scale": base.head_dim**-0.5,
            "rope_local_theta": _LOCAL_ROPE_THETA,
            "sliding_window": meta.get("gemma3.attention.sliding_window", 512),
            "sliding_layers": _sliding_layers(base.num_layers),
        }
    )


def fix_hf_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm scales by ``1 + w``; fold the 1 into the weight."""
    return tensor + 1.0 if name.endswith("norm.weight") else tensor


FAMILY = ModelFamily(
    name="gemma3",
    hf_architectures=("Gemma3ForCausalLM", "Gemma3TextModel"),
    gguf_architectures=("gemma3",),
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
    fix_hf_tensor=fix_hf_tensor,
)
