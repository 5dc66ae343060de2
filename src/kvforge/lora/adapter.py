"""PEFT LoRA adapters: read ``adapter_config.json`` + ``adapter_model.safetensors``, refuse
what the engine cannot apply exactly, and name each update by the base model's module.

A PEFT LoRA on a linear ``W`` [out, in] adds ``scaling * B @ A`` with ``A`` [r, in], ``B``
[out, r] and ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). Tensors are
named ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``; the key kept here
is the module path after ``model.``: ``layers.{i}.self_attn.q_proj``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kvforge.errors import InvalidRequestError

# Projections a LoRA may target: each maps onto a (fused) linear of the model.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def module_path(layer: int, target: str) -> str:
    """PEFT's module path of ``target`` in layer ``layer``: ``layers.3.self_attn.q_proj``."""
    return f"layers.{layer}.{'mlp' if target in _MLP_TARGETS else 'self_attn'}.{target}"


_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


def _error(path: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"LoRA adapter {path}: {message}", "lora")


@dataclass
class LoRAAdapter:
    """One adapter's low-rank pairs by module path, in float32, with its scaling folded into
    ``B``; ``rank`` is the largest rank of any module."""

    path: str
    rank: int
    # "layers.3.self_attn.q_proj" -> (A [r, in], scaling * B [out, r])
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        """Memory of the tensors."""
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def _checked_pairs(
    path: str, pairs: dict[str, dict[str, torch.Tensor]], max_rank: int
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Each module's (A, B) in float32, after the checks every adapter format shares."""
    if not pairs:
        raise _error(path, "the adapter holds no LoRA weights")
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise _error(path, f"{module} lacks lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"].float(), pair["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise _error(path, f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
        if a.shape[0] > max_rank:
            raise _error(path, f"rank {a.shape[0]} is above --max-lora-rank {max_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise _error(path, f"{module} holds non-finite values")
        yield module, a, b


def load_peft_adapter(path: str, max_rank: int, scale: float = 1.0) -> LoRAAdapter:
    """Read a PEFT LoRA directory; ``scale`` multiplies every update (llama.cpp's
    ``--lora-scaled``). Raises ``InvalidRequestError`` with a one-line reason."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isdir(path):
        raise _error(path, "no such directory")
    if not os.path.isfile(config_path):
        raise _error(path, "adapter_config.json is missing")
    if not os.path.isfile(weights_path):
        bin_only = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        detail = "only safetensors weights are read" if bin_only else "it is missing"
        raise _error(path, f"adapter_model.safetensors: {detail}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(path, f"adapter_config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise _error(path, "adapter_config.json must hold an object")
    alpha = _check_config(path, config)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _error(path, f"adapter_model.safetensors is unreadable ({exc})") from exc
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if match is None:
            raise _error(path, f"unexpected tensor {name!r} (only lora_A / lora_B weights)")
        module, which = match.groups()
        if module.rsplit(".", 1)[-1] not in TARGETS or not module.startswith("layers."):
            raise _error(path, f"LoRA on {module!r} is not supported (targets: {TARGETS})")
        pairs.setdefault(module, {})[which] = tensor
    adapter = LoRAAdapter(path, 0)
    rsl = bool(config.get("use_rslora", False))
    for module, a, b in _checked_pairs(path, pairs, max_rank):
        rank = a.shape[0]
        scaling = scale * alpha / (math.sqrt(rank) if rsl else rank)
        adapter.modules[module] = (a.contiguous(), (b * scaling).contiguous())
        adapter.rank = max(adapter.rank, rank)
    return adapter


def _check_config(path: str, config: dict) -> float:
    """Refuse PEFT options the engine would apply wrongly; return lora_alpha."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _error(path, f"peft_type {peft_type!r} is not LoRA")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise _error(path, f"{key} is not supported")
    if config.get("modules_to_save"):
        raise _error(path, "modules_to_save (fully trained modules) is not supported")
    if config.get("bias", "none") != "none":
        raise _error(path, f"bias={config['bias']!r} is not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise _error(path, f"{key} (per-module ranks or alphas) is not supported")
    alpha = config.get("lora_alpha", config.get("r", 8))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _error(path, "lora_alpha must be a number")
    return float(alpha)


def load_gguf_adapter(
    path: str, max_rank: int, scale: float, num_heads: int, num_kv_heads: int
) -> LoRAAdapter:
    """A llama.cpp LoRA adapter file (``general.type = adapter``, ``adapter.type = lora``,
    ``blk.N.attn_q.weight.lora_a`` / ``.lora_b`` pairs, ``adapter.lora.alpha``). Llama-family
    files store Q/K rows interleaved as llama.cpp's base weights are; they are put back in the
    Hugging Face order the model uses."""
    from kvforge.errors import KVForgeError
    from kvforge.loader.gguf_check import open_gguf
    from kvforge.loader.gguf_loader import dequantize_tensor, hf_tensor_name, unpermute_qk
    from kvforge.models.registry import family_for_gguf

    try:
        reader = open_gguf(path)
    except KVForgeError as exc:
        raise _error(path, str(exc)) from exc

    def text(key: str) -> str:
        field = reader.fields.get(key)
        return str(field.contents()) if field is not None else ""

    if text("general.type") != "adapter" or text("adapter.type") != "lora":
        raise _error(path, "not a LoRA adapter GGUF (general.type adapter, adapter.type lora)")
    arch = text("general.architecture")
    try:
        permutes = family_for_gguf(arch).gguf_permutes_qk
    except KVForgeError as exc:
        raise _error(path, str(exc)) from exc
    alpha_field = reader.fields.get("adapter.lora.alpha")
    alpha = float(alpha_field.contents()) if alpha_field is not None else 0.0
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tensor in reader.tensors:
        base, _, which = tensor.name.rpartition(".")
        if which not in ("lora_a", "lora_b") or not base.startswith("blk."):
            raise _error(path, f"unsupported tensor {tensor.name!r} (only blk.* lora_a / lora_b)")
        try:
            hf = hf_tensor_name(base, arch.startswith("gemma"))
        except KVForgeError as exc:
            raise _error(path, str(exc)) from exc
        module = hf.removeprefix("model.").removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            raise _error(path, f"LoRA on {module!r} is not supported (targets: {TARGETS})")
        pairs.setdefault(module, {})["A" if which == "lora_a" else "B"] = dequantize_tensor(tensor)
    adapter = LoRAAdapter(path, 0)
    for module, a, b in _checked_pairs(path, pairs, max_rank):
        rank = a.shape[0]
        if permutes and module.endswith("q_proj"):
            b = unpermute_qk(b, num_heads)
        elif permutes and module.endswith("k_proj"):
            b = unpermute_qk(b, num_kv_heads)
        # llama.cpp: scale * alpha / rank, or scale alone when the file has no alpha
        scaling = scale * (alpha / rank if alpha else 1.0)
        adapter.modules[module] = (a.contiguous(), (b * scaling).contiguous())
        adapter.rank = max(adapter.rank, rank)
    return adapter
