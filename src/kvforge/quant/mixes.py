"""Which GGML type each tensor gets for a llama.cpp file type (``Q4_K_M`` and friends).

The _S/_M/_L variants follow llama.cpp's ``llama_tensor_get_type``: the output matrix gets
Q6_K, attention V and FFN down get more bits in some layers, K-quant rows that are not a
multiple of 256 values fall back to a 32-block type of similar size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType, LlamaFileType
from gguf import GGMLQuantizationType as QT

from kvforge.errors import InvalidRequestError

_LAYER_NAME = re.compile(r"blk\.(\d+)\.([^.]*)", re.ASCII)

# file type name -> base tensor type
BASE_TYPES: dict[str, GGMLQuantizationType] = {
    "F32": QT.F32,
    "F16": QT.F16,
    "BF16": QT.BF16,
    "Q8_0": QT.Q8_0,
    "Q4_0": QT.Q4_0,
    "Q4_1": QT.Q4_1,
    "Q5_0": QT.Q5_0,
    "Q5_1": QT.Q5_1,
    "IQ4_NL": QT.IQ4_NL,
    "Q2_K": QT.Q2_K,
    "Q3_K_S": QT.Q3_K,
    "Q3_K_M": QT.Q3_K,
    "Q3_K_L": QT.Q3_K,
    "Q4_K_S": QT.Q4_K,
    "Q4_K_M": QT.Q4_K,
    "Q5_K_S": QT.Q5_K,
    "Q5_K_M": QT.Q5_K,
    "Q6_K": QT.Q6_K,
}
# K-quant rows must be a multiple of 256 values; llama.cpp's substitutes otherwise
_FALLBACK = {
    QT.Q2_K: QT.IQ4_NL,
    QT.Q3_K: QT.IQ4_NL,
    QT.Q4_K: QT.Q5_0,
    QT.Q5_K: QT.Q5_1,
    QT.Q6_K: QT.Q8_0,
}


def file_type_id(name: str) -> int:
    """``general.file_type`` of a file type name."""
    if name == "F32":
        return int(LlamaFileType.ALL_F32)
    return int(LlamaFileType[f"MOSTLY_{name}"])


def parse_file_type(name: str) -> str:
    """Canonical file type name, or a typed error listing the choices."""
    key = name.upper()
    if key not in BASE_TYPES:
        raise InvalidRequestError(f"unknown type {name!r}; choose from {', '.join(BASE_TYPES)}")
    return key


def _use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third."""
    return (
        layer < num_layers // 8
        or layer >= 7 * num_layers // 8
        or (layer - num_layers // 8) % 3 == 2
    )


@dataclass(frozen=True)
class MixOptions:
    """Overrides of ``kvforge quantize``."""

    pure: bool = False
    output_tensor_type: GGMLQuantizationType | None = None
    token_embedding_type: GGMLQuantizationType | None = None


def tensor_type(
    name: str,
    num_columns: int,
    file_type: str,
    num_layers: int,
    has_output: bool,
    gqa_ratio: int = 1,
    options: MixOptions | None = None,
) -> GGMLQuantizationType:
    """The type of one weight matrix (GGUF name, row length) in a file of ``file_type``."""
    options = options or MixOptions()
    base = BASE_TYPES[file_type]
    chosen = base
    is_output = name == "output.weight" or (not has_output and name == "token_embd.weight")
    # the layer as llama.cpp reads it (sscanf "blk.%d."): a name without one is in no layer
    in_layer = _LAYER_NAME.match(name)
    layer = int(in_layer.group(1)) if in_layer else -1
    kind = in_layer.group(2) if in_layer else name.split(".")[0]
    if is_output and options.output_tensor_type is not None:
        chosen = options.output_tensor_type
    elif name == "token_embd.weight" and options.token_embedding_type is not None:
        chosen = options.token_embedding_type
    elif options.pure or base in (QT.F32, QT.F16, QT.BF16):
        chosen = base
    elif is_output:
        chosen = base if base == QT.Q8_0 else QT.Q6_K
    elif kind == "attn_v":
        chosen = _attn_v(file_type, base, layer, num_layers, gqa_ratio)
    elif kind == "ffn_down":
        chosen = _ffn_down(file_type, base, layer, num_layers)
    elif kind == "attn_output":
        chosen = {"Q2_K": QT.Q3_K, "Q3_K_M": QT.Q4_K, "Q3_K_L": QT.Q5_K}.get(file_type, base)
    block, _ = GGML_QUANT_SIZES[chosen] if chosen not in (QT.F32, QT.F16, QT.BF16) else (1, 0)
    if num_columns % block:
        chosen = _FALLBACK.get(chosen, QT.F16) if block == QK_K else QT.F16
        if num_columns % 32:
            chosen = QT.F16
    return chosen


def _attn_v(
    file_type: str, base: GGMLQuantizationType, layer: int, num_layers: int, gqa_ratio: int
) -> GGMLQuantizationType:
    if file_type == "Q2_K":
        return QT.Q4_K if gqa_ratio >= 4 else QT.Q3_K
    if file_type == "Q3_K_M":
        return QT.Q5_K if layer < 2 else QT.Q4_K
    if file_type == "Q3_K_L":
        return QT.Q5_K
    if file_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, num_layers):
        return QT.Q6_K
    if file_type == "Q4_K_S" and layer < 4:
        return QT.Q5_K
    return base


def _ffn_down(
    file_type: str, base: GGMLQuantizationType, layer: int, num_layers: int
) -> GGMLQuantizationType:
    if file_type == "Q2_K":
        return QT.Q3_K
    if file_type == "Q3_K_M":
        return QT.Q5_K if layer < num_layers // 16 else QT.Q4_K
    if file_type == "Q3_K_L":
        return QT.Q5_K
    if file_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, num_layers):
        return QT.Q6_K
    return base
