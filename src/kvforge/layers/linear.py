"""Linear layers whose parameters load through ``weight_loader`` (fusing q/k/v, gate/up).

A checkpoint tensor arrives either as float values or, for packed weights, as the common
``Unpacked`` block form; the latter replaces the float parameter with a quant method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.layers.lora import LoRABatch, LoRASlots
from kvforge.layers.quantization import (
    BaseQuantMethod,
    BlockInt8Method,
    QuantGemmMethod,
    create_embedding_method,
    create_fused_quant_method,
    create_quant_method,
)
from kvforge.ops.extension import cpu_ops
from kvforge.quant.formats import Unpacked

Loaded = torch.Tensor | Unpacked


def _check_shape(expected: tuple[int, ...], loaded: Loaded, what: str) -> None:
    shape = tuple(loaded.codes.shape if isinstance(loaded, Unpacked) else loaded.shape)
    if shape != expected:
        raise ValueError(f"{what}: expected {expected}, checkpoint has {shape}")


# Few rows of float32 activations (a decode step of a small batch, a speculative verification)
# against float32 weights: the C++ ``float_gemm`` reads each weight row once for all rows. 60
# SmolLM2 matrices (3072x576 and 576x1536) from memory, two threads: 1 row 20.2 -> 11.8 ms
# (ATen's GEMV), 2 rows 40.6 -> 14.3 ms, 5 rows 35.9 -> 22.0 ms, 8 rows 40.1 -> 27.3 ms. Without
# the extension, ``W x^T`` (the weight as ATen's plain operand) is the better call from 2 rows.
_SKINNY_MAX_ROWS = 16


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x W^T (+ b)`` for a float weight, with the few-row CPU case on its own kernel."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    skinny = 0 < rows <= _SKINNY_MAX_ROWS and not needs_grad  # the C++ op has no backward
    if skinny and x.dtype == weight.dtype == torch.float32 and x.is_cpu:
        flat = x.reshape(rows, x.shape[-1])
        ops = cpu_ops(x)
        if ops is not None:
            y = ops.float_gemm(flat, weight)
        elif rows > 1:
            y = torch.mm(weight, flat.t()).t().contiguous()
        else:
            return F.linear(x, weight, bias)
        y = y.view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """``y = x W^T (+ b)``; ``W`` is [out_features, in_features], float or packed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.quant: BaseQuantMethod | None = None
        # Packed weights: run with 8-bit activations (set by the loader before loading).
        self.quantize_activations = False
        # Adapter slots, when LoRA is enabled (``enable_lora``).
        self.lora: LoRASlots | None = None

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        """Apply the layer, plus the adapters' updates of ``lora``'s tokens."""
        if self.quant is None:
            assert self.weight is not None
            y = dense_linear(x, self.weight, self.bias)
        else:
            y = self.quant(x)
            y = y if self.bias is None else y + self.bias
        if lora is not None and self.lora is not None:
            y = self.lora.apply(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), lora)
        return y

    @property
    def shard_sizes(self) -> list[int]:
        """Output sizes of the projections stacked in this layer (one for a plain linear)."""
        return [self.out_features]

    def enable_lora(self, num_slots: int, max_rank: int, device: torch.device) -> None:
        """Give the layer ``num_slots`` empty adapter slots of rank up to ``max_rank``."""
        self.lora = LoRASlots(num_slots, max_rank, self.in_features, self.shard_sizes, device)

    def _use_packed(self, method: BaseQuantMethod) -> None:
        self.quant = method
        self.weight = None  # the float parameter is no longer needed

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: object = None) -> None:
        """Copy a checkpoint tensor into ``param`` (or keep packed weights packed)."""
        _check_shape(tuple(param.shape), loaded, "weight")
        if isinstance(loaded, Unpacked):
            self._use_packed(create_quant_method(loaded, param.device, self.quantize_activations))
        else:
            param.data.copy_(loaded)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension.

    ``shards`` names each part in order (``("q", "k", "v")`` or ``(0, 1)`` for gate/up) with its
    output size; the checkpoint's separate tensors load into their slice.
    """

    def __init__(
        self, in_features: int, shard_sizes: dict[object, int], bias: bool = False
    ) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[object, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self._pending: dict[object, Unpacked] = {}

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: object = None) -> None:
        """Copy one shard's tensor into its rows; packed shards wait for their siblings."""
        offset, size = self.shard_offsets[shard]
        _check_shape((size, *param.shape[1:]), loaded, f"shard {shard!r}")
        if not isinstance(loaded, Unpacked):
            param.data[offset : offset + size].copy_(loaded)
            return
        self._pending[shard] = loaded
        if len(self._pending) == len(self.shard_offsets):
            parts = [self._pending[name] for name in self.shard_offsets]
            self._pending = {}
            self._use_packed(
                create_fused_quant_method(parts, param.device, self.quantize_activations)
            )

    @property
    def shard_sizes(self) -> list[int]:
        """Output sizes of the stacked projections, in order."""
        return [size for _, size in self.shard_offsets.values()]

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Split a fused output back into its shards."""
        return list(y.split([size for _, size in self.shard_offsets.values()], dim=-1))


class VocabEmbedding(nn.Module):
    """Token embedding [V, E], float or packed; also the tied LM head."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.quant: BlockInt8Method | QuantGemmMethod | None = None
        self.quantize_activations = False  # as in Linear: the tied LM head's activations

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [T, E] of token ids [T]."""
        if self.quant is None:
            assert self.weight is not None
            return F.embedding(input_ids, self.weight)
        return self.quant.rows(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W^T``: the tied LM head (float32 out of packed weights)."""
        if self.quant is None:
            assert self.weight is not None
            return dense_linear(hidden, self.weight)
        return self.quant(hidden, precise=True)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: object = None) -> None:
        """Copy float weights, or keep block codes (row lookups need the byte layout)."""
        _check_shape(tuple(param.shape), loaded, "embedding")
        if isinstance(loaded, Unpacked):
            self.quant = create_embedding_method(loaded, param.device, self.quantize_activations)
            self.weight = None
        else:
            param.data.copy_(loaded)
