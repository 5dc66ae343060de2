"""Llama 1/2/3, SmolLM, Mistral and Mixtral: the plain pre-norm decoder (Mixtral's experts
are the llama architecture with ``expert_count`` in GGUF)."""

from __future__ import annotations

from typing import Any

from kvforge.config import TransformerConfig
from kvforge.models.registry import ModelFamily


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig from a Llama-like config.json."""
    num_heads = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        architecture=hf.get("architectures", ["LlamaForCausalLM"])[0],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=_rope_theta(hf, 10000.0),
        rope_scaling=_rope_scaling(hf),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=hf.get("attention_bias", False),
        sliding_window=hf.get("sliding_window"),
    )
    if fields["sliding_window"]:
        fields["sliding_layers"] = (True,) * fields["num_layers"]
    fields.update(moe_from_hf(hf))
    fields.update(overrides)
    return TransformerConfig(**fields)


def moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Mixture-of-experts fields of a config.json (none for a dense model). Mixtral names its
    expert count ``num_local_experts`` and always renormalises; Qwen and OLMoE say
    ``num_experts`` and ``norm_topk_prob``, Qwen adds dense layers (``mlp_only_layers``,
    ``decoder_sparse_step``) and a gated shared expert."""
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if not num_experts:
        return {}
    num_layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    shared = hf.get("shared_expert_intermediate_size") or 0
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
        norm_topk_prob=hf.get("norm_topk_prob", True),
        shared_expert_intermediate_size=shared,
        shared_expert_gate=bool(shared),
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
    )


def _rope_theta(hf: dict[str, Any], default: float) -> float:
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or default)


def _rope_scaling(hf: dict[str, Any]) -> dict[str, object] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return None
    return dict(scaling)


def config_from_gguf(meta: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig from GGUF metadata of a llama-arch file."""
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length") or hidden // num_heads
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    fields: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=num_heads,
        num_kv_heads=get("attention.head_count_kv") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=get("context_length", 4096),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in meta["__tensor_names__"],
        qkv_bias="blk.0.attn_q.bias" in meta["__tensor_names__"],
    )
    fields.update(moe_from_gguf(meta, fields["num_layers"]))
    fields.update(overrides)
    return TransformerConfig(**fields)


# llama.cpp fixes per architecture whether the top-k routing weights are renormalised (llama /
# Mixtral and qwen3moe do); ``{arch}.expert_weights_norm`` overrides it.
_UNNORMALIZED_ARCHS = ("qwen2moe", "olmoe")


def moe_from_gguf(meta: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Mixture-of-experts fields of GGUF metadata (none for a dense file). A layer routes when
    its ``ffn_gate_inp`` router tensor is present."""
    arch = meta["general.architecture"]
    normalize = arch not in _UNNORMALIZED_ARCHS
    num_experts = meta.get(f"{arch}.expert_count") or 0
    if not num_experts:
        return {}
    names = meta["__tensor_names__"]
    shared = meta.get(f"{arch}.expert_shared_feed_forward_length") or 0
    gating = meta.get(f"{arch}.expert_gating_func", 1)  # llama.cpp: 1 softmax, 2 sigmoid
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=meta[f"{arch}.expert_used_count"],
        moe_intermediate_size=meta.get(f"{arch}.expert_feed_forward_length")
        or meta[f"{arch}.feed_forward_length"],
        norm_topk_prob=meta.get(f"{arch}.expert_weights_norm", normalize),
        router_scoring="sigmoid" if gating == 2 else "softmax",
        shared_expert_intermediate_size=shared,
        shared_expert_gate=bool(shared) and "blk.0.ffn_gate_inp_shexp.weight" in names,
        moe_layers=tuple(f"blk.{i}.ffn_gate_inp.weight" in names for i in range(num_layers)),
    )


FAMILY = ModelFamily(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
    gguf_architectures=("llama", "mistral"),
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
    gguf_permutes_qk=True,
)
