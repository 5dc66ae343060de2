"""Quant methods: a linear layer's packed weights and the matmul that reads them directly.

Every GGUF block type unpacks to ``w = codes * scale + min`` per group of columns (see
:mod:`kvforge.quant.formats`); a method keeps that packed form and never materialises the
whole float matrix:

- :class:`Int4PackedMethod`: 4-bit codes with one scale and zero per group of 32..256 columns
  (Q4_0, Q4_1, Q4_K, int4 on-load), run by ATen's ``_weight_int4pack_mm_for_cpu`` which
  computes ``(q - 8) * scale + zero`` exactly as these formats define it.
- :class:`BlockInt8Method`: signed 8-bit codes with per-group scales (and mins): Q8_0, the 5-
  and 6-bit types, Q2_K/Q3_K, IQ4_NL, int8 on-load. Few rows (decode): one
  ``_weight_int8pack_mm`` per column group, summed with per-group scales. Many rows (prefill):
  dequantize a tile of output rows at a time and use the dense matmul.
- :class:`QuantGemmMethod`: every format, in blocks of 32 columns (4-bit codes when they fit,
  else int8) run by the C++ ``quant_gemm`` (``csrc/quant_gemm.cpp``), which quantizes the
  activations per block to int16 (default: closer to float32 than the ATen kernels' bfloat16
  activations) or to int8 (``quantize_activations``, as llama.cpp does) and uses integer dot
  products. Chosen on the CPU whenever the extension builds; the ATen methods above are the
  fallback.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.quant.formats import Unpacked

# Up to this many input rows the grouped int8 kernel beats dequantize-then-matmul.
_GROUPED_MAX_ROWS = 8
_GROUPED_MAX_GROUPS = 48
_TILE_ROWS = 4096
_INT4_GROUPS = (32, 64, 128, 256)
_QUANT_GEMM_BLOCK = 32  # quant_gemm takes groups of 16 columns or of a multiple of 32
# The CPU int4/int8 kernels run with bf16 activations and scales (fp32 ones fall back, 6-15x
# slower); a float16 model converts the scales with the rest of its floats.
_KERNEL_DTYPE = torch.bfloat16


class BaseQuantMethod(nn.Module, ABC):
    """Packed weights of one linear layer [out_features, in_features] and their matmul."""

    out_features: int
    in_features: int

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` for x [..., in_features]."""

    def weight_bytes(self) -> int:
        """Bytes held by the packed weights."""
        return sum(t.numel() * t.element_size() for t in self.buffers())


class Int4PackedMethod(BaseQuantMethod):
    """4-bit codes in ATen's CPU int4 layout with bf16 scale/zero per group."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, weights: Unpacked) -> None:
        super().__init__()
        codes = weights.codes.to(torch.int32)
        if weights.mins is None:  # symmetric codes in [-8, 7]
            codes, zeros = codes + 8, torch.zeros_like(weights.scales)
        else:  # codes in [0, 15]: w = q*s + m = (q - 8)*s + (m + 8s)
            zeros = weights.mins + 8 * weights.scales
        self.out_features, self.in_features = codes.shape
        self.group = weights.group
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # [groups, out_features, 2]: scale and zero of each group
        self.register_buffer(
            "scales_zeros",
            torch.stack([weights.scales.T, zeros.T], -1).to(_KERNEL_DTYPE).contiguous(),
        )

    @staticmethod
    def supports(weights: Unpacked, device: torch.device) -> bool:
        """Whether these codes fit the int4 kernel (CPU, 4-bit codes, a supported group)."""
        if device.type != "cpu" or weights.group not in _INT4_GROUPS:
            return False
        low, high = (-8, 7) if weights.mins is None else (0, 15)
        codes = weights.codes
        return bool(codes.min() >= low and codes.max() <= high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See :meth:`BaseQuantMethod.forward`."""
        flat = x.reshape(-1, self.in_features).to(self.scales_zeros.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, self.group, self.scales_zeros
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class BlockInt8Method(BaseQuantMethod):
    """Signed 8-bit codes with a scale (and optional min) per group of columns."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    def __init__(self, weights: Unpacked) -> None:
        super().__init__()
        rows, cols = weights.codes.shape
        self.out_features, self.in_features, self.group = rows, cols, weights.group
        self.num_groups = cols // weights.group
        # [groups, out_features, group]: each group's codes contiguous for the int8 kernel
        codes = weights.codes.view(rows, self.num_groups, self.group).transpose(0, 1)
        self.register_buffer("codes", codes.contiguous())
        # [groups, out]
        self.register_buffer("scales", weights.scales.T.to(_KERNEL_DTYPE).contiguous())
        # mins stay float32: w = q*s + m cancels for low-bit types, so m needs the precision
        mins = None if weights.mins is None else weights.mins.T.float().contiguous()
        self.register_buffer("mins", mins)

    def _dequantize(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        tile = self.codes[:, start:stop].to(dtype) * self.scales[:, start:stop, None].to(dtype)
        if self.mins is not None:
            tile = tile + self.mins[:, start:stop, None].to(dtype)
        return tile.transpose(0, 1).reshape(stop - start, self.in_features)

    def forward(self, x: torch.Tensor, precise: bool = False) -> torch.Tensor:
        """See :meth:`BaseQuantMethod.forward`.

        ``precise`` (logits): the grouped path sums its per-group partials in float32, and the
        tiled path multiplies in float32, so no bf16 rounding lands on the output.
        """
        flat = x.reshape(-1, self.in_features)
        grouped = (
            flat.shape[0] <= _GROUPED_MAX_ROWS
            and self.num_groups <= _GROUPED_MAX_GROUPS
            and flat.device.type == "cpu"
        )
        if grouped:
            y = self._grouped(flat)
        else:
            y = self._tiled(flat, torch.float32 if precise else self.scales.dtype)
        return y.to(torch.float32 if precise else x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _grouped(self, flat: torch.Tensor) -> torch.Tensor:
        """Float32 [N, out]: one int8 kernel call per column group, partials summed in float32."""
        parts = flat.to(self.scales.dtype).view(flat.shape[0], self.num_groups, self.group)
        y = torch.zeros(flat.shape[0], self.out_features, dtype=torch.float32)
        for g in range(self.num_groups):
            y += torch.ops.aten._weight_int8pack_mm(
                parts[:, g].contiguous(), self.codes[g], self.scales[g]
            )
        if self.mins is not None:  # sum_g min[n, g] * sum(x in group g)
            sums = flat.float().view(flat.shape[0], self.num_groups, self.group).sum(-1)
            y += sums @ self.mins.float()
        return y

    def _tiled(self, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N, out] in ``dtype``: dequantize a tile of output rows at a time, dense matmul."""
        flat = flat.to(dtype)
        tiles = range(0, self.out_features, _TILE_ROWS)
        return torch.cat(
            [
                F.linear(flat, self._dequantize(s, min(s + _TILE_ROWS, self.out_features), dtype))
                for s in tiles
            ],
            dim=-1,
        )

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``W[index]`` (embedding lookup) in the scales' dtype."""
        flat = index.reshape(-1)
        w = self.codes[:, flat].to(self.scales.dtype) * self.scales[:, flat, None]
        if self.mins is not None:
            w = w + self.mins[:, flat, None]
        return w.transpose(0, 1).reshape(*index.shape, self.in_features)


class QuantGemmMethod(BaseQuantMethod):
    """Blocks of 32 columns run by the C++ ``quant_gemm`` with int16- or int8-quantized
    activations (``act_bits``).

    Layout (see ``csrc/quant_gemm.cpp``): ``qs`` uint8 [out, in/32, 16] (two 4-bit codes a byte)
    or int8 [out, in/32, 32]; ``scales`` (and ``mins``) [out, in/sub] with sub = 16 for 16-column
    groups, else 32 (larger groups repeat their scale over their 32-blocks), float16 when every
    value is exactly one (Q4_0, Q4_1, Q8_0: less memory traffic per token), else float32. On
    CPUs with VNNI, 32-column groups of a multiple of 8 rows take the row-interleaved layout of
    ``csrc/quant_gemm_il.cpp`` instead (``qs`` [out/W, in/32, W, 16 or 32], ``scales`` and
    ``mins`` [out/W, in/32, W], with W = 16 where 512-bit VNNI is built and out % 16 == 0, else
    8): 2-3x faster at one row, 1.5-1.8x at 16, faster than the float GEMM even at 512 rows.
    """

    qs: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    def __init__(self, weights: Unpacked, ops: ModuleType, act_bits: int = 16) -> None:
        super().__init__()
        self._ops = ops
        self.act_bits = act_bits
        self.out_features, self.in_features = weights.codes.shape
        qs, scales, mins = ops.quant_gemm_repack(
            weights.codes.to(torch.int8), weights.scales, weights.mins, weights.group
        )
        self.register_buffer("qs", qs)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    @staticmethod
    def supports(weights: Unpacked, device: torch.device) -> bool:
        """Whether the kernel takes these weights (CPU, whole 32-blocks, a supported group)."""
        cols = weights.codes.shape[1]
        return (
            device.type == "cpu"
            and (weights.group == _QUANT_GEMM_BLOCK // 2 or weights.group % _QUANT_GEMM_BLOCK == 0)
            and cols % _QUANT_GEMM_BLOCK == 0
        )

    def forward(self, x: torch.Tensor, precise: bool = False) -> torch.Tensor:
        """See :meth:`BaseQuantMethod.forward`; ``precise`` returns the float32 result as is."""
        flat = x.reshape(-1, self.in_features)
        if flat.dtype not in (torch.float32, torch.bfloat16):
            flat = flat.float()
        y = self._ops.quant_linear(flat, self.qs, self.scales, self.mins, self.act_bits)  # [M, out]
        return y.to(torch.float32 if precise else x.dtype).reshape(*x.shape[:-1], self.out_features)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``W[index]`` (embedding lookup), float32."""
        flat = index.reshape(-1)
        if self.qs.dim() == 4:  # interleaved groups of 8 rows
            w = self._ops.quant_gemm_il_rows(self.qs, self.scales, self.mins, flat)
            return w.reshape(*index.shape, self.in_features)
        qs = self.qs[flat]  # [T, in/32, 16 or 32]
        if qs.shape[-1] == _QUANT_GEMM_BLOCK // 2:  # low nibbles: columns 0..15, high: 16..31
            qs = torch.stack([qs & 0x0F, qs >> 4], dim=2)
        sub = self.in_features // self.scales.shape[1]
        w = qs.reshape(flat.shape[0], -1, sub).float() * self.scales[flat, :, None].float()
        if self.mins is not None:
            w = w + self.mins[flat, :, None].float()
        return w.reshape(*index.shape, self.in_features)


class Fp8Method(BaseQuantMethod):
    """FP8 (e4m3) weights with float32 scales per group of columns (per tensor and per channel
    are one group a row). The CPU has no FP8 matmul: each tile of output rows is widened to
    the activations' dtype (exact: every e4m3 value is a bfloat16) and scaled, then a dense
    matmul; per-row scales are applied to the output instead, one multiply per output."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weights: Unpacked) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.codes.shape
        self.group = weights.group
        self.register_buffer("codes", weights.codes.contiguous())
        self.register_buffer("scales", weights.scales.float().contiguous())

    def _tile(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        w = self.codes[start:stop].to(dtype)
        if self.group == self.in_features:
            return w
        rows = stop - start
        w = w.view(rows, -1, self.group) * self.scales[start:stop, :, None].to(dtype)
        return w.view(rows, self.in_features)

    def forward(self, x: torch.Tensor, precise: bool = False) -> torch.Tensor:
        """See :meth:`BaseQuantMethod.forward`."""
        flat = x.reshape(-1, self.in_features)
        dtype = torch.float32 if precise or flat.dtype == torch.float32 else torch.bfloat16
        flat = flat.to(dtype)
        tiles = range(0, self.out_features, _TILE_ROWS)
        y = torch.cat(
            [
                F.linear(flat, self._tile(s, min(s + _TILE_ROWS, self.out_features), dtype))
                for s in tiles
            ],
            dim=-1,
        )
        if self.group == self.in_features:
            y = y * self.scales[:, 0].to(dtype)
        return y.to(torch.float32 if precise else x.dtype).reshape(*x.shape[:-1], self.out_features)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``W[index]`` (embedding lookup), float32."""
        flat = index.reshape(-1)
        w = self.codes[flat].float().view(flat.shape[0], -1, self.group)
        w = w * self.scales[flat, :, None]
        return w.reshape(*index.shape, self.in_features)


class PermutedMethod(BaseQuantMethod):
    """Act-order weights stored with their columns sorted by group: the input's columns are
    gathered in the same order (``perm``) before the inner method runs."""

    perm: torch.Tensor

    def __init__(self, inner: BaseQuantMethod, perm: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.register_buffer("perm", perm.long())

    def forward(self, x: torch.Tensor, precise: bool = False) -> torch.Tensor:
        """See :meth:`BaseQuantMethod.forward`."""
        gathered = x.index_select(-1, self.perm)
        return self.inner(gathered, precise) if precise else self.inner(gathered)


class ConcatMethod(BaseQuantMethod):
    """Shards of a fused layer whose formats differ (e.g. Q4_K q/k with a Q6_K v)."""

    def __init__(self, shards: list[BaseQuantMethod]) -> None:
        super().__init__()
        self.shards = nn.ModuleList(shards)
        self.in_features = shards[0].in_features
        self.out_features = sum(s.out_features for s in shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See :meth:`BaseQuantMethod.forward`."""
        return torch.cat([shard(x) for shard in self.shards], dim=-1)


# name -> "module:Class"; create_quant_method picks the first that supports the weights
_METHODS: dict[str, str] = {
    "int4": "kvforge.layers.quantization:Int4PackedMethod",
    "block_int8": "kvforge.layers.quantization:BlockInt8Method",
    "quant_gemm": "kvforge.layers.quantization:QuantGemmMethod",
}


def _method_class(name: str) -> type[BaseQuantMethod]:
    module_name, class_name = _METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]


def _quant_gemm_ops(weights: Unpacked, device: torch.device) -> ModuleType | None:
    """The C++ ops module when its ``quant_gemm`` can run these weights on ``device``."""
    if not QuantGemmMethod.supports(weights, device):
        return None
    from kvforge.ops import extension  # deferred: may build the extension (once)

    return extension.load_extension().module


def create_quant_method(
    weights: Unpacked, device: torch.device, quantize_activations: bool = False
) -> BaseQuantMethod:
    """The fastest method that holds these codes exactly on ``device``.

    On the CPU with the C++ extension that is ``quant_gemm`` with int16 activations (1.3-3x the
    ATen kernels, 7x on the LM head at 16 rows, and closer to float32). NOTE: 8-bit activations
    (``quantize_activations``) gain a further 5-25% but cost top-1 agreement with the float32
    reference on the embedded model (96.8% against the 98% floor), so they are opt-in.
    """
    if weights.perm is not None:
        inner = create_quant_method(weights._replace(perm=None), device, quantize_activations)
        return PermutedMethod(inner, weights.perm).to(device)
    if weights.codes.dtype == torch.float8_e4m3fn:
        return Fp8Method(weights).to(device)
    ops = _quant_gemm_ops(weights, device)
    if ops is not None:
        return QuantGemmMethod(weights, ops, 8 if quantize_activations else 16)
    if Int4PackedMethod.supports(weights, device):
        return _method_class("int4")(weights).to(device)
    return _method_class("block_int8")(weights).to(device)


def create_embedding_method(
    weights: Unpacked, device: torch.device, quantize_activations: bool = False
) -> BlockInt8Method | QuantGemmMethod | Fp8Method:
    """Packed embedding rows that also serve as the tied LM head (both have ``rows()``); see
    :func:`create_quant_method` for ``quantize_activations``."""
    if weights.perm is not None:
        raise ValueError("an embedding cannot hold act-order (column-permuted) codes")
    if weights.codes.dtype == torch.float8_e4m3fn:
        return Fp8Method(weights).to(device)
    ops = _quant_gemm_ops(weights, device)
    if ops is not None:
        return QuantGemmMethod(weights, ops, 8 if quantize_activations else 16)
    return BlockInt8Method(weights).to(device)


def create_fused_quant_method(
    parts: list[Unpacked], device: torch.device, quantize_activations: bool = False
) -> BaseQuantMethod:
    """One method over stacked shards when their layouts agree, else one per shard."""
    merged = concat_unpacked(parts)
    if merged is not None:
        return create_quant_method(merged, device, quantize_activations)
    return ConcatMethod([create_quant_method(p, device, quantize_activations) for p in parts])


def concat_unpacked(parts: list[Unpacked]) -> Unpacked | None:
    """Stack shards along the output dimension when their layouts agree (fused q/k/v)."""
    first = parts[0]
    same_group = all(p.group == first.group for p in parts)
    same_mins = all((p.mins is None) == (first.mins is None) for p in parts)
    same_codes = all(p.codes.dtype == first.codes.dtype for p in parts)
    same_perm = all(
        p.perm is None
        if first.perm is None
        else p.perm is not None and torch.equal(p.perm, first.perm)
        for p in parts
    )
    if not (same_group and same_mins and same_codes and same_perm):
        return None
    mins = None if first.mins is None else torch.cat([p.mins for p in parts])  # type: ignore[misc]
    codes, scales = torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts])
    return Unpacked(codes, scales, mins, first.group, first.perm)
