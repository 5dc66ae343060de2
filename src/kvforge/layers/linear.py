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
    Fp8Method,
    QuantGemmMethod,
    create_embedding_method,
    create_fused_quant_method,
    create_quant_method,
)
from kvforge.ops.extension import cpu_ops
from kvforge.parallel.group import TensorParallel, shard_range
from kvforge.quant.formats import Unpacked

Loaded = torch.Tensor | Unpacked


def _check_shape(expected: tuple[int, ...], loaded: Loaded, what: str) -> None:
    shape = tuple(loaded.codes.shape if isinstance(loaded, Unpacked) else loaded.shape)
    if shape != expected:
        raise ValueError(f"{what}: expected {expected}, checkpoint has {shape}")


def narrow(loaded: Loaded, dim: int, start: int, length: int) -> Loaded:
    """Rows (dim 0) or columns (dim 1) ``start : start + length`` of a float tensor or of
    packed blocks (whose column ranges must cover whole groups)."""
    if not isinstance(loaded, Unpacked):
        return loaded.narrow(dim, start, length)
    if dim == 0:
        part = slice(start, start + length)
        mins = None if loaded.mins is None else loaded.mins[part]
        return Unpacked(loaded.codes[part], loaded.scales[part], mins, loaded.group, loaded.perm)
    if loaded.perm is not None:
        raise ValueError("act-order (column-permuted) weights cannot be split by input columns")
    group = loaded.group
    if group == loaded.codes.shape[1]:  # one scale per row holds for any part of the row
        return Unpacked(loaded.codes[:, start : start + length], loaded.scales, loaded.mins, length)
    if start % group or length % group:
        raise ValueError(f"a shard of {length} columns splits blocks of {group}")
    groups = slice(start // group, (start + length) // group)
    mins = None if loaded.mins is None else loaded.mins[:, groups]
    codes = loaded.codes[:, start : start + length]
    return Unpacked(codes, loaded.scales[:, groups], mins, group)


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
    """``y = x W^T (+ b)``; ``W`` is [out_features, in_features], float or packed.

    Under tensor parallelism (``tp`` with more than one rank) ``split`` is ``"column"`` (this
    rank holds out_features / size output rows; no communication) or ``"row"`` (in_features /
    size input columns; the partial products are all-reduced, then the bias is added once).
    ``in_features`` / ``out_features`` are this rank's sizes; checkpoints hold the full matrix.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TensorParallel | None = None,
        split: str | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 and split is not None else None
        self.tp_split = split if self.tp is not None else None
        if self.tp is not None and split == "column":
            out_features = shard_range(out_features, self.tp.rank, self.tp.size, "outputs")[1]
        elif self.tp is not None and split == "row":
            in_features = shard_range(in_features, self.tp.rank, self.tp.size, "inputs")[1]
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
        bias = None if self.tp_split == "row" else self.bias
        if self.quant is None:
            assert self.weight is not None
            y = dense_linear(x, self.weight, bias)
        else:
            y = self.quant(x)
            y = y if bias is None else y + bias
        if self.tp_split == "row":
            assert self.tp is not None
            y = self.tp.all_reduce(y.contiguous())
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

    def local_shard(self, param: nn.Parameter, loaded: Loaded) -> Loaded:
        """This rank's part of a full checkpoint tensor for ``param`` (checked against the
        full shape first)."""
        if self.tp is None:
            return loaded
        size, rank = self.tp.size, self.tp.rank
        full = list(param.shape)
        dim = 0 if self.tp_split == "column" else 1
        if dim >= len(full):  # a row-parallel bias is whole on every rank
            return loaded
        full[dim] *= size
        _check_shape(tuple(full), loaded, "weight")
        return narrow(loaded, dim, rank * param.shape[dim], param.shape[dim])

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: object = None) -> None:
        """Copy a checkpoint tensor into ``param`` (or keep packed weights packed)."""
        loaded = self.local_shard(param, loaded)
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
        self,
        in_features: int,
        shard_sizes: dict[object, int],
        bias: bool = False,
        tp: TensorParallel | None = None,
    ) -> None:
        # Under tensor parallelism every shard is split by rank (column parallel).
        if tp is not None and tp.size > 1:
            shard_sizes = {
                name: shard_range(size, tp.rank, tp.size, f"shard {name!r}")[1]
                for name, size in shard_sizes.items()
            }
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.tp_split = "column" if self.tp is not None else None
        self.shard_offsets: dict[object, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self._pending: dict[object, Unpacked] = {}
        self._seen: set[object] = set()  # shards loaded

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: object = None) -> None:
        """Copy one shard's tensor into its rows; packed shards wait for their siblings."""
        offset, size = self.shard_offsets[shard]
        self._seen.add(shard)
        if self.tp is not None:  # this rank's rows of the full shard
            _check_shape((size * self.tp.size, *param.shape[1:]), loaded, f"shard {shard!r}")
            loaded = narrow(loaded, 0, self.tp.rank * size, size)
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

    def finish_loading(self) -> None:
        """Shards in different formats (a float up with a packed gate): the layer runs in
        float, so dequantize the packed shards still waiting for their siblings."""
        missing = [name for name in self.shard_offsets if name not in self._seen]
        if missing:
            raise ValueError(f"checkpoint lacks shard(s) {missing} of a fused projection")
        for name, loaded in self._pending.items():
            assert self.weight is not None
            offset, size = self.shard_offsets[name]
            self.weight.data[offset : offset + size].copy_(loaded.dequantize())
        self._pending = {}

    @property
    def shard_sizes(self) -> list[int]:
        """Output sizes of the stacked projections, in order."""
        return [size for _, size in self.shard_offsets.values()]

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Split a fused output back into its shards."""
        return list(y.split([size for _, size in self.shard_offsets.values()], dim=-1))


class VocabEmbedding(nn.Module):
    """Token embedding [V, E], float or packed; also the tied LM head. Under tensor
    parallelism each rank holds V / size rows: a lookup zeroes the ids of other ranks' rows and
    all-reduces; the tied head all-gathers the ranks' logits."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.vocab_start = 0
        if self.tp is not None:
            self.vocab_start, num_embeddings = shard_range(
                num_embeddings, self.tp.rank, self.tp.size, "vocabulary"
            )
        self.num_embeddings = num_embeddings
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.quant: BlockInt8Method | QuantGemmMethod | Fp8Method | None = None
        self.quantize_activations = False  # as in Linear: the tied LM head's activations

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [T, E] of token ids [T]."""
        if self.tp is None:
            return self._rows(input_ids)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        rows = self._rows(torch.where(mine, local, 0)) * mine.unsqueeze(-1)
        return self.tp.all_reduce(rows.contiguous())

    def _rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            assert self.weight is not None
            return F.embedding(input_ids, self.weight)
        return self.quant.rows(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W^T``: the tied LM head (float32 out of packed weights)."""
        if self.quant is None:
            assert self.weight is not None
            logits = dense_linear(hidden, self.weight)
        else:
            logits = self.quant(hidden, precise=True)
        return logits if self.tp is None else self.tp.all_gather(logits)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: object = None) -> None:
        """Copy float weights, or keep block codes (row lookups need the byte layout)."""
        if self.tp is not None:
            _check_shape((self.num_embeddings * self.tp.size, param.shape[1]), loaded, "embedding")
            loaded = narrow(loaded, 0, self.vocab_start, self.num_embeddings)
        _check_shape(tuple(param.shape), loaded, "embedding")
        if isinstance(loaded, Unpacked):
            self.quant = create_embedding_method(loaded, param.device, self.quantize_activations)
            self.weight = None
        else:
            param.data.copy_(loaded)
