"""GGUF files: metadata, tokenizer and tensors via the gguf reader (open files with
:func:`kvforge.loader.gguf_check.open_gguf`, which checks them first).

Quantized matrices are yielded either dequantized to float32 (the reference path) or, when
``packed``, in the common block form (:class:`kvforge.quant.Unpacked`) that the quant methods
keep in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from kvforge.errors import ModelFileError, UnsupportedModelError
from kvforge.models.registry import ModelFamily
from kvforge.quant.formats import QUANT_TYPES, Unpacked, dequantize, unpack_rows

SUPPORTED_TYPES = {
    GGMLQuantizationType[name]
    for name in (
        [
            "F32",
            "F16",
            "BF16",
            "Q8_0",
            "Q4_0",
            "Q4_1",
            "Q5_0",
            "Q5_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "IQ4_NL",
            # no kernel here: read dequantized by the gguf package's reference code
            "IQ4_XS",
            "IQ3_S",
            "IQ3_XXS",
            "IQ2_S",
            "IQ2_XS",
            "IQ2_XXS",
            "IQ1_S",
            "IQ1_M",
        ]
    )
}

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixture of experts: router, stacked experts (split per expert on load), shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Pre-norm models call the MLP's norm ffn_norm; sandwich-norm (Gemma) files add two more.
PRE_NORM_NAMES = {"ffn_norm": "post_attention_layernorm"}
_SANDWICH = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _file_of(reader: GGUFReader) -> str:
    return str(getattr(reader.data, "filename", None) or "GGUF file")


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value fields as Python values, plus ``__tensor_names__``."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, TypeError) as exc:  # e.g. a string that is not UTF-8
            raise ModelFileError(_file_of(reader), f"metadata key {key!r}: {exc}") from exc
    meta["__tensor_names__"] = {t.name for t in reader.tensors}
    return meta


def hf_tensor_name(gguf_name: str, sandwich_norm: bool) -> str:
    """Hugging Face name of a GGUF tensor name (``blk.3.attn_q.weight`` -> ...)."""
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk":
        raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")
    table = {**LAYER_NAMES, **(_SANDWICH if sandwich_norm else PRE_NORM_NAMES)}
    if parts[2] not in table:
        raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{parts[1]}.{table[parts[2]]}.{suffix}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of Q/K rows so the NeoX (half-split) rotary applies."""
    head_dim = weight.shape[0] // num_heads
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def _tensor_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape))


def _raw(tensor: Any) -> torch.Tensor:
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"tensor {tensor.name} has unsupported type {tensor.tensor_type.name}"
        )
    return torch.from_numpy(np.array(tensor.data))  # a private copy of the mmapped bytes


def dequantize_tensor(tensor: Any) -> torch.Tensor:
    """Float32 values of one reader tensor, shaped [rows, columns] (PyTorch order)."""
    return dequantize(_raw(tensor), tensor.tensor_type, _tensor_shape(tensor))


def _permute_rows(value: torch.Tensor | Unpacked, num_heads: int) -> torch.Tensor | Unpacked:
    if isinstance(value, Unpacked):
        mins = None if value.mins is None else unpermute_qk(value.mins, num_heads)
        return Unpacked(
            unpermute_qk(value.codes, num_heads),
            unpermute_qk(value.scales, num_heads),
            mins,
            value.group,
        )
    return unpermute_qk(value, num_heads)


def _split_experts(
    name: str, value: torch.Tensor | Unpacked, num_experts: int
) -> Iterator[tuple[str, torch.Tensor | Unpacked]]:
    """A stacked ``mlp.experts.<proj>.weight`` [X, rows, cols] as one tensor per expert under
    the per-expert checkpoint names (``mlp.experts.<e>.<proj>.weight``)."""
    for e in range(num_experts):
        expert_name = name.replace(".experts.", f".experts.{e}.")
        if isinstance(value, Unpacked):
            rows = value.codes.shape[0] // num_experts
            part = slice(e * rows, (e + 1) * rows)
            mins = None if value.mins is None else value.mins[part]
            yield expert_name, Unpacked(value.codes[part], value.scales[part], mins, value.group)
        else:
            yield expert_name, value[e]


def iter_gguf_weights(
    reader: GGUFReader,
    family: ModelFamily,
    num_heads: int,
    num_kv_heads: int,
    sandwich: bool,
    packed: bool = False,
) -> Iterator[tuple[str, torch.Tensor | Unpacked]]:
    """(Hugging Face name, float32 tensor or packed blocks) for every tensor in the file."""
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, sandwich)
        value: torch.Tensor | Unpacked
        shape = _tensor_shape(tensor)
        try:
            kernel = tensor.tensor_type in QUANT_TYPES  # the others load dequantized
            if packed and kernel and len(shape) in (2, 3):
                value = unpack_rows(_raw(tensor), tensor.tensor_type, shape)
            else:
                value = dequantize_tensor(tensor)
        except (ValueError, IndexError) as exc:  # check_gguf_file should have caught it
            raise ModelFileError(_file_of(reader), f"tensor {tensor.name!r}: {exc}") from exc
        if family.gguf_permutes_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            value = _permute_rows(value, num_heads)
        elif family.gguf_permutes_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            value = _permute_rows(value, num_kv_heads)
        if len(shape) == 3 and ".experts." in name:
            yield from _split_experts(name, value, shape[0])
        else:
            yield name, value
