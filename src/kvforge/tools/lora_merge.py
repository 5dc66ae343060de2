"""``kvforge lora merge``: fold a PEFT LoRA adapter into its base model's weights.

Each targeted projection becomes ``W + scale * B @ A`` (the adapter's scaling folded into B,
see ``lora/adapter.py``). A GGUF base gives a GGUF file of any type (every tensor dequantized,
the updates added, then quantized by ``kvforge quantize``'s mix; Llama-family Q/K rows are
interleaved as llama.cpp stores them, so the update is interleaved the same way). A Hugging Face
directory gives a directory (the same safetensors shards, configuration and tokenizer), or a
GGUF file through ``kvforge convert`` (and ``quantize`` for types convert does not write).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from kvforge.errors import InvalidRequestError, ModelNotFoundError
from kvforge.loader.gguf_check import open_gguf
from kvforge.loader.gguf_loader import hf_tensor_name
from kvforge.lora.adapter import LoRAAdapter, load_peft_adapter
from kvforge.models.registry import family_for_gguf
from kvforge.tools.convert import convert, permute_qk
from kvforge.tools.quantize import quantize_file

logger = logging.getLogger(__name__)

_MAX_RANK = 4096  # merging has no slots: any rank an adapter file holds


def _deltas(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    """Hugging Face weight name -> update [out, in]."""
    return {f"model.{module}.weight": b @ a for module, (a, b) in adapter.modules.items()}


def _unused(path: str, deltas: dict[str, torch.Tensor], used: set[str]) -> None:
    missing = sorted(set(deltas) - used)
    if missing:
        raise InvalidRequestError(f"LoRA adapter {path}: the base model has no {missing[0]}")


def merge_gguf(
    base: str,
    adapter_path: str,
    out: str,
    file_type: str,
    scale: float = 1.0,
    show_progress: bool = True,
) -> dict[str, int]:
    """A GGUF base plus the adapter, written as ``file_type``."""
    deltas = _deltas(load_peft_adapter(adapter_path, _MAX_RANK, scale))
    reader = open_gguf(base)
    arch = str(reader.fields["general.architecture"].contents())
    family = family_for_gguf(arch)
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field is not None else heads
    sandwich = arch.startswith("gemma")
    used: set[str] = set()

    def add_update(name: str, values: np.ndarray) -> np.ndarray:
        hf = hf_tensor_name(name, sandwich) if name.startswith("blk.") else name
        delta = deltas.get(hf)
        if delta is None:
            return values
        if family.gguf_permutes_qk and hf.endswith("q_proj.weight"):
            delta = permute_qk(delta, heads)
        elif family.gguf_permutes_qk and hf.endswith("k_proj.weight"):
            delta = permute_qk(delta, kv_heads)
        if tuple(delta.shape) != values.shape:
            raise InvalidRequestError(
                f"LoRA adapter {adapter_path}: {hf} update is {tuple(delta.shape)}, the base "
                f"tensor {values.shape}"
            )
        used.add(hf)
        return (values.astype(np.float32) + delta.numpy()).astype(np.float32)

    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        staged = str(Path(tmp) / Path(out).name)
        counts = quantize_file(
            base, staged, file_type, show_progress=show_progress, adjust=add_update
        )
        _unused(adapter_path, deltas, used)  # before anything is written where asked
        shutil.move(staged, out)
    return counts


def merge_hf_directory(base: str, adapter_path: str, out: str, scale: float = 1.0) -> None:
    """A Hugging Face directory plus the adapter, written as a directory of the same shape."""
    from safetensors.torch import load_file, save_file

    deltas = _deltas(load_peft_adapter(adapter_path, _MAX_RANK, scale))
    source, target = Path(base), Path(out)
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise ModelNotFoundError(f"no safetensors weights in {base}")
    if target.exists() and any(target.iterdir()):
        raise InvalidRequestError(f"{out} exists and is not empty")
    used: set[str] = set()
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for shard in shards:
        tensors = load_file(str(shard))
        for name in list(tensors):
            delta = deltas.get(name)
            if delta is None:
                continue
            weight = tensors[name]
            if tuple(delta.shape) != tuple(weight.shape):
                raise InvalidRequestError(
                    f"LoRA adapter {adapter_path}: {name} update is {tuple(delta.shape)}, the "
                    f"base tensor {tuple(weight.shape)}"
                )
            tensors[name] = (weight.float() + delta).to(weight.dtype)
            used.add(name)
        merged[shard.name] = tensors
    _unused(adapter_path, deltas, used)
    target.mkdir(parents=True, exist_ok=True)
    for name, tensors in merged.items():
        save_file(tensors, str(target / name), metadata={"format": "pt"})
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, target / item.name)


def merge(
    base: str,
    adapter_path: str,
    out: str,
    file_type: str = "F16",
    scale: float = 1.0,
    show_progress: bool = True,
) -> None:
    """Merge ``adapter_path`` into ``base`` (GGUF file or HF directory) and write ``out``: a
    GGUF file of ``file_type`` when it ends in .gguf, else a Hugging Face directory."""
    to_gguf = out.endswith(".gguf")
    if Path(base).is_dir():
        if not to_gguf:
            merge_hf_directory(base, adapter_path, out, scale)
            return
        with tempfile.TemporaryDirectory() as tmp:
            merged = str(Path(tmp) / "merged")
            merge_hf_directory(base, adapter_path, merged, scale)
            outtype = file_type.lower()
            if outtype in ("f32", "f16", "q8_0"):
                convert(merged, out, outtype)
            else:
                staged = str(Path(tmp) / "merged-f32.gguf")
                convert(merged, staged, "f32")
                quantize_file(staged, out, file_type, show_progress=show_progress)
        return
    if not Path(base).is_file():
        raise ModelNotFoundError(f"no model at {base}")
    if not to_gguf:
        raise InvalidRequestError("a GGUF base merges into a .gguf output")
    counts = merge_gguf(base, adapter_path, out, file_type, scale, show_progress)
    logger.info("merged %s into %s: %s", adapter_path, out, counts)
