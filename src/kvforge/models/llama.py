"""Llama 1/2/3, SmolLM and Mistral: the plain pre-norm decoder."""

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
    fields.update(overrides)
    return TransformerConfig(**fields)


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
    fields.update(overrides)
    return TransformerConfig(**fields)


FAMILY = ModelFamily(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    gguf_architectures=("llama", "mistral"),
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
    gguf_permutes_qk=True,
)
