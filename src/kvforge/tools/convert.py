"""``kvforge convert``: a Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory, or a mixture
of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), to a GGUF file.

Writes llama.cpp's metadata keys, the byte-level BPE tokenizer (tokens, types, merges, special
ids, pre-tokenizer name), the chat template and the tensors under GGUF names, with Q/K rows
interleaved the way llama.cpp's rotary expects for the llama architecture. Experts are stacked
into llama.cpp's 3-D ``ffn_{gate,up,down}_exps`` tensors; routers stay float32.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFWriter, LlamaFileType
from tqdm import tqdm

from kvforge.config import TransformerConfig
from kvforge.errors import InvalidRequestError, ModelFileError, UnsupportedModelError
from kvforge.layers.moe import canonical_moe_name, expert_param
from kvforge.loader.gguf_loader import GLOBAL_NAMES, LAYER_NAMES, PRE_NORM_NAMES
from kvforge.loader.hf_loader import iter_hf_weights, read_hf_config
from kvforge.loader.model_loader import check_experts
from kvforge.models.registry import family_for_hf
from kvforge.ops.blocks import NonFiniteError
from kvforge.quant.formats import QT
from kvforge.quant.gguf_file import add_tensor, finish
from kvforge.utils import check_output_path

logger = logging.getLogger(__name__)

_OUTTYPES = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# Hugging Face architecture -> GGUF architecture (Mixtral is llama.cpp's llama with experts)
_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "OlmoeForCausalLM": "olmoe",
}
_EXPERT_PARTS = {0: "ffn_gate_exps", 1: "ffn_up_exps", None: "ffn_down_exps"}
# token types of llama.cpp
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# GGUF pre-tokenizer names of the split regexes our GGUF tokenizer knows
_PRE_BY_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}": "qwen2",
}


def _gguf_names() -> dict[str, str]:
    names = {f"{hf}.weight": f"{g}.weight" for g, hf in GLOBAL_NAMES.items()}
    for table in (LAYER_NAMES, PRE_NORM_NAMES):
        for gguf_part, hf_part in table.items():
            names[hf_part] = gguf_part
    return names


def gguf_tensor_name(hf_name: str) -> str:
    """GGUF name of a Hugging Face tensor name."""
    names = _gguf_names()
    if hf_name in names:
        return names[hf_name]
    parts = hf_name.removeprefix("model.").split(".")
    if parts[0] != "layers":
        raise UnsupportedModelError(f"unexpected tensor {hf_name!r}")
    module, suffix = ".".join(parts[2:-1]), parts[-1]
    if module not in names:
        raise UnsupportedModelError(f"unexpected tensor {hf_name!r}")
    return f"blk.{parts[1]}.{names[module]}.{suffix}"


def permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Interleave the rotary halves of each head's Q/K rows (llama.cpp's layout)."""
    head_dim = weight.shape[0] // num_heads
    w = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "default"
    parts = spec.get("pretokenizers", [spec])
    types = [p.get("type") for p in parts]
    if "Digits" in types and types[-1] == "ByteLevel":
        return "smollm"
    for part in parts:
        pattern = (part.get("pattern") or {}).get("Regex", "")
        for prefix, name in _PRE_BY_REGEX.items():
            if pattern.startswith(prefix):
                return name
    return "gpt2"


def _add_tokenizer(writer: GGUFWriter, directory: Path, hf: dict[str, Any]) -> None:
    spec = json.loads((directory / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UnsupportedModelError("convert supports byte-level BPE tokenizers only")
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    added_ids = {a["id"] for a in spec.get("added_tokens", [])}
    types = [
        _CONTROL if i in special else _USER_DEFINED if i in added_ids else _NORMAL
        for i in range(len(tokens))
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config_file = directory / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text()) if config_file.exists() else {}
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
    ):
        entry = tok_config.get(key)
        content = entry.get("content") if isinstance(entry, dict) else entry
        if content in vocab:
            add(vocab[content])
        elif hf.get(f"{key}_id") is not None:
            add(int(hf[f"{key}_id"]))
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])


def _add_moe_hparams(writer: GGUFWriter, cfg: TransformerConfig) -> None:
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
    if cfg.shared_expert_intermediate_size:
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if cfg.clip_qkv is not None:
        writer.add_clamp_kqv(float(cfg.clip_qkv))


def _add_hparams(
    writer: GGUFWriter, hf: dict[str, Any], cfg: TransformerConfig, name: str
) -> tuple[int, int]:
    num_heads = hf["num_attention_heads"]
    num_kv_heads = hf.get("num_key_value_heads") or num_heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    writer.add_name(name)
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(float(hf.get("rms_norm_eps", 1e-5)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(hf["vocab_size"])
    return num_heads, num_kv_heads


def convert(
    src: str | Path, dst: str | Path, outtype: str = "f16", show_progress: bool = True
) -> int:
    """Write ``dst`` from the Hugging Face directory ``src``; returns the tensor count."""
    if outtype not in _OUTTYPES:
        raise InvalidRequestError(f"unknown outtype {outtype!r}; use f32, f16 or q8_0", "outtype")
    directory = Path(src)
    hf = read_hf_config(directory)  # raises ModelNotFoundError without a config.json
    architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    family = family_for_hf(architecture)
    if architecture not in _ARCHS:
        supported = ", ".join(sorted(_ARCHS))
        raise UnsupportedModelError(f"convert supports {supported}, not {architecture}")
    arch = _ARCHS[architecture]
    cfg = family.config_from_hf(hf)
    check_experts(cfg, directory)
    check_output_path(dst)
    matrix_type, file_type = _OUTTYPES[outtype]
    writer = GGUFWriter(str(dst), arch=arch)
    num_heads, num_kv_heads = _add_hparams(writer, hf, cfg, directory.name)
    if cfg.num_experts:
        _add_moe_hparams(writer, cfg)
    writer.add_file_type(int(file_type))
    _add_tokenizer(writer, directory, hf)
    count = 0
    tied = hf.get("tie_word_embeddings", False)
    experts: dict[str, dict[int, torch.Tensor]] = {}  # stacked tensor name -> expert -> rows
    weights = iter_hf_weights(directory, family)
    for hf_name, tensor in tqdm(
        weights, desc="Converting", unit="tensor", disable=not show_progress
    ):
        if tied and hf_name == "lm_head.weight":
            continue
        hf_name = canonical_moe_name(hf_name)
        expert = expert_param(hf_name.removeprefix("model."))
        if expert is not None:  # held until the layer's last expert arrives, then stacked
            layer = hf_name.removeprefix("model.").split(".")[1]
            name = f"blk.{layer}.{_EXPERT_PARTS[expert[1][1]]}.weight"
            experts.setdefault(name, {})[expert[1][0]] = tensor
            if len(experts[name]) < cfg.num_experts:
                continue
            parts = experts.pop(name)
            tensor = torch.stack([parts[e] for e in range(cfg.num_experts)])
        else:
            name = gguf_tensor_name(hf_name)
        if arch == "llama" and ".attn_q." in name:
            tensor = permute_qk(tensor, num_heads)
        elif arch == "llama" and ".attn_k." in name:
            tensor = permute_qk(tensor, num_kv_heads)
        values = tensor.float().numpy()
        router = ".ffn_gate_inp" in name  # routing is sensitive: kept float32, as llama.cpp
        qtype = matrix_type if values.ndim >= 2 and not router else QT.F32
        if qtype == QT.Q8_0 and values.shape[-1] % 32:
            qtype = QT.F16
        try:
            add_tensor(writer, name, values, qtype)
        except NonFiniteError:
            raise ModelFileError(src, f"tensor {hf_name} holds NaN or infinite values") from None
        count += 1
    if experts:
        raise UnsupportedModelError(f"checkpoint lacks experts of {sorted(experts)[:4]}")
    finish(writer)
    logger.info("wrote %s (%s, %d tensors)", dst, outtype, count)
    return count
