"""``kvforge moe upcycle``: a dense llama-architecture GGUF turned into a mixture of experts.

Every layer's MLP becomes ``num_experts`` identical experts (the dense ``ffn_gate`` / ``ffn_up``
/ ``ffn_down`` bytes repeated into llama.cpp's 3-D ``ffn_*_exps`` tensors, in their own
quantized type, so nothing is re-rounded) and a router ``ffn_gate_inp`` with random float32
weights. Mixtral's routing renormalises the top-k weights to sum to 1, so with identical experts
the layer computes the dense MLP whatever the router picks: the file generates the dense model's
tokens, which checks the MoE path on real weights. It is also the starting point of sparse
upcycling (Komatsuzaki et al.), where the copies are then trained apart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from tqdm import tqdm

from kvforge.errors import InvalidRequestError, UnsupportedModelError
from kvforge.loader.gguf_check import open_gguf
from kvforge.tools.quantize import copy_metadata
from kvforge.utils import check_output_path

logger = logging.getLogger(__name__)

_DENSE = {"ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps"}


def upcycle(
    src: str | Path,
    dst: str | Path,
    num_experts: int = 4,
    num_active: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> int:
    """Write ``dst`` with ``num_experts`` copies of each MLP, ``num_active`` routed per token
    (default all); returns the number of layers converted."""
    num_active = num_experts if num_active is None else num_active
    if not 1 <= num_active <= num_experts <= 256:
        raise InvalidRequestError("need 1 <= active experts <= experts <= 256", "num_experts")
    if seed < 0:
        raise InvalidRequestError("the router seed must be >= 0", "seed")
    check_output_path(dst)
    reader = open_gguf(src)
    arch = str(reader.fields["general.architecture"].contents())
    if arch != "llama":
        raise UnsupportedModelError(f"upcycling takes a llama-architecture GGUF, not {arch}")
    if f"{arch}.expert_count" in reader.fields:
        raise InvalidRequestError(f"{src} is a mixture of experts already")
    hidden = int(reader.fields[f"{arch}.embedding_length"].contents())
    writer = GGUFWriter(str(dst), arch=arch)
    copy_metadata(reader, writer)
    writer.add_expert_count(num_experts)
    writer.add_expert_used_count(num_active)
    rng = np.random.default_rng(seed)
    layers = set()
    for tensor in tqdm(reader.tensors, desc="Upcycling", unit="tensor", disable=not show_progress):
        stem, suffix = tensor.name.rsplit(".", 1)
        parts = stem.split(".")
        name, data = tensor.name, np.array(tensor.data)  # floats, or raw bytes [rows, row bytes]
        if len(parts) == 3 and parts[2] in _DENSE and suffix == "weight":
            name = f"blk.{parts[1]}.{_DENSE[parts[2]]}.weight"
            data = np.stack([data] * num_experts)  # [X, rows, ...]
            if parts[2] == "ffn_gate":
                router = rng.normal(0.0, hidden**-0.5, (num_experts, hidden)).astype(np.float32)
                writer.add_tensor(f"blk.{parts[1]}.ffn_gate_inp.weight", router)
                layers.add(parts[1])
        # bytes of a block type keep their type; the writer derives the shape in elements
        raw_dtype = tensor.tensor_type if data.dtype == np.uint8 else None
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    logger.info(
        "wrote %s: %d layers of %d experts (%d active)", dst, len(layers), num_experts, num_active
    )
    return len(layers)
