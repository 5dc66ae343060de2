"""GGML block formats: byte layouts packed and unpacked with torch, byte-compatible with llama.cpp.

Every quantized type unpacks to one common form, ``w = codes * scales + mins`` per group of
``group`` columns, with small integer ``codes`` (int8) and float32 ``scales`` / ``mins`` (``mins``
is ``None`` for symmetric types). The runtime kernels and our dequantizer both start from it.

Block layouts (bytes, in order), elements per block in brackets:
  Q8_0 [32]   d:f16, qs:i8[32]                      w = d*q
  Q4_0 [32]   d:f16, qs:u8[16] (lo nibble j, hi j+16)  w = d*(q-8)
  Q4_1 [32]   d:f16, m:f16, qs:u8[16]               w = d*q + m
  Q5_0 [32]   d:f16, qh:u32 (bit j = bit 4 of j), qs:u8[16]   w = d*(q-16)
  Q5_1 [32]   d:f16, m:f16, qh:u32, qs:u8[16]       w = d*q + m
  IQ4_NL [32] d:f16, qs:u8[16]                      w = d*GRID[q]
  Q2_K [256]  scales:u8[16] (lo sc, hi m), qs:u8[64], d:f16, dmin:f16   groups of 16
  Q3_K [256]  hmask:u8[32], qs:u8[64], scales:u8[12] (6-bit, +32), d:f16  groups of 16
  Q4_K [256]  d:f16, dmin:f16, scales:u8[12] (6-bit sc/m), qs:u8[128]   groups of 32
  Q5_K [256]  d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]     groups of 32
  Q6_K [256]  ql:u8[128], qh:u8[64], scales:i8[16], d:f16               groups of 16
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QT = GGMLQuantizationType
QK_K = 256
# llama.cpp's non-linear 4-bit grid of IQ4_NL
IQ4_NL_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}
QUANT_TYPES = {
    QT.Q8_0,
    QT.Q4_0,
    QT.Q4_1,
    QT.Q5_0,
    QT.Q5_1,
    QT.IQ4_NL,
    QT.Q2_K,
    QT.Q3_K,
    QT.Q4_K,
    QT.Q5_K,
    QT.Q6_K,
}


class Unpacked(NamedTuple):
    """``w = codes * scales + mins`` per group; codes [rows, cols], scales/mins [rows, groups].

    ``codes`` are int8, or float8_e4m3fn for FP8 checkpoints. ``perm`` (act-order GPTQ) says
    the columns are stored sorted by group: stored column ``i`` is input column ``perm[i]``.
    """

    codes: torch.Tensor  # int8 or float8_e4m3fn
    scales: torch.Tensor  # float32
    mins: torch.Tensor | None
    group: int
    perm: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """Float32 weights [rows, cols], in input column order."""
        rows, cols = self.codes.shape
        w = self.codes.reshape(rows, -1, self.group).float() * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        w = w.view(rows, cols)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w


def block_shape(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


def _f16(raw: torch.Tensor, start: int) -> torch.Tensor:
    """[n] float32 from the little-endian f16 at byte ``start`` of each block."""
    return raw[:, start : start + 2].contiguous().view(torch.float16)[:, 0].float()


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles then high nibbles of each 32-byte run: [n, m] bytes -> [n, 2m] codes."""
    n = qs.shape[0]
    q = qs.view(n, -1, 1, 32) if qs.shape[1] >= 32 else qs.view(n, 1, 1, -1)
    return torch.cat([q & 0x0F, q >> 4], dim=2).reshape(n, -1)


def _u8(codes: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Codes (int8 from the C++ quantizer, float or int from torch) plus ``offset``, as uint8.

    NOTE: the packers work on bytes: a quarter of the memory traffic of int32, which made them
    most of a quantizer's time once its searches ran in C++."""
    if codes.dtype == torch.int8:  # the offset codes still fit int8 (0..127)
        return (codes + offset if offset else codes).view(torch.uint8)
    if codes.dtype == torch.uint8 and not offset:
        return codes
    return (codes.to(torch.int16) + offset).to(torch.uint8)


def _pack_nibbles(q: torch.Tensor, run: int) -> torch.Tensor:
    n = q.shape[0]
    q = _u8(q).view(n, -1, 2, run)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _bits(raw: torch.Tensor, num_bits: int) -> torch.Tensor:
    """[n, bytes] -> [n, bytes*8] bits, little-endian within each byte."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((raw[..., None] >> shifts) & 1).reshape(raw.shape[0], -1)[:, :num_bits]


# Byte k of a little-endian int64 times 2^(56 - 7k) lands on bit 56 + k; every other product
# lands on a distinct bit (8k - 7k' is unique), so with 0/1 bytes nothing carries into the top byte.
_GATHER_BITS = sum(1 << (56 - 7 * k) for k in range(8))


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[n, 8m] 0/1 values -> [n, m] bytes, value 8i + k in bit k of byte i."""
    b = _u8(bits).contiguous().view(torch.int64)  # [n, m]: 8 bits as bytes of one int64
    return ((b * _GATHER_BITS) >> 56).to(torch.uint8)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in Q4_K/Q5_K's 12 bytes."""
    s = scales.to(torch.int32)
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1), torch.cat([lo_m, hi_m], 1)


def _pack_scale_min_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    out = torch.empty(sc.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out.to(torch.uint8)


def _q3_scales(scales: torch.Tensor) -> torch.Tensor:
    """Q3_K's sixteen 6-bit scales (stored +32) from 12 bytes: low nibbles, then 2 high bits."""
    s = scales.to(torch.int32)
    low = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], 1)  # [n, 16]
    high = torch.stack([(s[:, 8:12] >> (2 * j)) & 3 for j in range(4)], 1).reshape(-1, 16)
    return (low | (high << 4)) - 32


def _pack_q3_scales(sc: torch.Tensor) -> torch.Tensor:
    s = (sc.to(torch.int32) + 32) & 63
    out = torch.empty(s.shape[0], 12, dtype=torch.int32)
    out[:, 0:8] = (s[:, 0:8] & 0x0F) | ((s[:, 8:16] & 0x0F) << 4)
    high = (s >> 4).view(-1, 4, 4)  # [n, j, 4]: scale 4j + i
    out[:, 8:12] = sum(high[:, j, :] << (2 * j) for j in range(4))
    return out.to(torch.uint8)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: element n*128 + j*32 + l is bits 2j of byte n*32 + l."""
    n = qs.shape[0]
    q = qs.view(n, 2, 1, 32).to(torch.int32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(n, QK_K)


def _pack_crumbs(q: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_crumbs``: 2-bit codes [n, 256] (uint8) -> [n, 64] bytes."""
    return _or_shifted(q.view(q.shape[0], 2, 4, 32), 2).reshape(q.shape[0], 64)


def _or_shifted(q: torch.Tensor, bits: int) -> torch.Tensor:
    """OR of q[:, :, j] << (bits * j) over dim 2 of uint8 [n, a, j, b] -> [n, a, b]."""
    out = q[:, :, 0].clone()
    for j in range(1, q.shape[2]):
        out |= q[:, :, j] << (bits * j)
    return out


def unpack(raw: torch.Tensor, qtype: GGMLQuantizationType) -> Unpacked:
    """Blocks [n, type_size] (uint8) -> the common form, one row per block."""
    t = qtype
    if t == QT.Q8_0:
        return Unpacked(raw[:, 2:].contiguous().view(torch.int8), _f16(raw, 0)[:, None], None, 32)
    if t in (QT.Q4_0, QT.IQ4_NL):
        q = _nibbles(raw[:, 2:])
        d = _f16(raw, 0)[:, None]
        if t == QT.IQ4_NL:
            return Unpacked(torch.tensor(IQ4_NL_GRID, dtype=torch.int8)[q.long()], d, None, 32)
        return Unpacked(q.to(torch.int8), d, -8 * d, 32)
    if t == QT.Q4_1:
        return Unpacked(
            _nibbles(raw[:, 4:]).to(torch.int8), _f16(raw, 0)[:, None], _f16(raw, 2)[:, None], 32
        )
    if t in (QT.Q5_0, QT.Q5_1):
        off = 2 if t == QT.Q5_0 else 4
        q = _nibbles(raw[:, off + 4 :]) | (_bits(raw[:, off : off + 4], 32) << 4)
        d = _f16(raw, 0)[:, None]
        if t == QT.Q5_0:
            return Unpacked((q.to(torch.int16) - 16).to(torch.int8), d, None, 32)
        return Unpacked(q.to(torch.int8), d, _f16(raw, 2)[:, None], 32)
    if t == QT.Q2_K:
        sc = raw[:, 0:16].to(torch.int32)
        d, dmin = _f16(raw, 80)[:, None], _f16(raw, 82)[:, None]
        q = _crumbs(raw[:, 16:80])
        return Unpacked(q.to(torch.int8), d * (sc & 0x0F), -dmin * (sc >> 4), 16)
    if t == QT.Q3_K:
        low = _crumbs(raw[:, 32:96])
        # hmask bit (n*4 + j) of byte l is the high bit of element n*128 + j*32 + l
        high = _bits(raw[:, 0:32], 256).view(-1, 32, 8).transpose(1, 2).reshape(-1, QK_K)
        q = low - 4 * (1 - high.to(torch.int32))
        return Unpacked(
            q.to(torch.int8), _f16(raw, 108)[:, None] * _q3_scales(raw[:, 96:108]), None, 16
        )
    if t in (QT.Q4_K, QT.Q5_K):
        d, dmin = _f16(raw, 0)[:, None], _f16(raw, 2)[:, None]
        sc, m = _scale_min_k4(raw[:, 4:16])
        if t == QT.Q4_K:
            q = _nibbles(raw[:, 16:])
        else:
            high = _bits(raw[:, 16:48], 256).view(-1, 32, 8).transpose(1, 2).reshape(-1, QK_K)
            q = _nibbles(raw[:, 48:]) | (high << 4)
        return Unpacked(q.to(torch.int8), d * sc, -dmin * m, 32)
    if t == QT.Q6_K:
        n = raw.shape[0]
        ql = raw[:, 0:128].view(n, 2, 2, 32)  # [n, half, lo/hi 32-run, l]
        low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [n, half, 4, 32]: element half*128+j*32+l
        qh = raw[:, 128:192].view(n, 2, 1, 32).to(torch.int32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)
        q = low.to(torch.int32) | (((qh >> shifts) & 3) << 4)
        scales = raw[:, 192:208].contiguous().view(torch.int8).float()
        d = _f16(raw, 208)[:, None]
        return Unpacked((q - 32).reshape(n, QK_K).to(torch.int8), d * scales, None, 16)
    raise ValueError(f"no unpacker for {qtype.name}")


def dequantize(
    data: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Float32 tensor of ``shape`` (PyTorch order) from raw bytes of type ``qtype``."""
    if qtype in FLOAT_TYPES:
        dtype = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}[qtype]
        return data.contiguous().view(torch.uint8).view(dtype).float().reshape(shape)
    if qtype not in QUANT_TYPES:
        # Types with no kernel here (the IQ family but IQ4_NL): the gguf package's reference
        # dequantization, so such files load as float weights
        import gguf.quants

        block, size = block_shape(qtype)
        if shape[-1] % block:
            raise ValueError(f"{qtype.name} needs rows of a multiple of {block}, got {shape[-1]}")
        raw = data.contiguous().view(torch.uint8).reshape(-1, shape[-1] // block * size)
        try:
            values = gguf.quants.dequantize(raw.numpy(), qtype)
        except NotImplementedError as exc:
            raise ValueError(f"{qtype.name} tensors cannot be read") from exc
        return torch.from_numpy(values.copy()).float().reshape(shape)
    rows = unpack_rows(data, qtype, shape)
    return rows.dequantize().reshape(shape)


def unpack_rows(
    data: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> Unpacked:
    """Unpack a [rows, bytes] (or flat) tensor into per-row codes/scales of ``shape``."""
    block, size = block_shape(qtype)
    cols = shape[-1]
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block}, got {cols}")
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    blocks = data.contiguous().view(torch.uint8).reshape(-1, size)
    u = unpack(blocks, qtype)
    groups = cols // u.group
    return Unpacked(
        u.codes.reshape(rows, cols),
        u.scales.reshape(rows, groups),
        None if u.mins is None else u.mins.reshape(rows, groups),
        u.group,
    )


def pack_blocks(qtype: GGMLQuantizationType, **fields: torch.Tensor) -> torch.Tensor:
    """Bytes [n, type_size] of one type from its fields (see the layouts in the module doc)."""
    t, f = qtype, fields
    if t == QT.Q8_0:
        return torch.cat([_f16_bytes(f["d"]), f["q"].to(torch.int8).view(torch.uint8)], 1)
    if t in (QT.Q4_0, QT.IQ4_NL):
        return torch.cat([_f16_bytes(f["d"]), _pack_nibbles(f["q"], 16)], 1)
    if t == QT.Q4_1:
        return torch.cat([_f16_bytes(f["d"]), _f16_bytes(f["m"]), _pack_nibbles(f["q"], 16)], 1)
    if t in (QT.Q5_0, QT.Q5_1):
        q = _u8(f["q"])
        head = [_f16_bytes(f["d"])] + ([_f16_bytes(f["m"])] if t == QT.Q5_1 else [])
        return torch.cat([*head, _pack_bits(q >> 4), _pack_nibbles(q & 0x0F, 16)], 1)
    if t == QT.Q2_K:
        sc = (f["sc"].to(torch.int32) | (f["m"].to(torch.int32) << 4)).to(torch.uint8)
        q = _u8(f["q"])
        return torch.cat([sc, _pack_crumbs(q), _f16_bytes(f["d"]), _f16_bytes(f["dmin"])], 1)
    if t == QT.Q3_K:
        q = _u8(f["q"], 4)  # 0..7
        high = (q >> 2).view(-1, 8, 32).transpose(1, 2).reshape(-1, QK_K)
        return torch.cat(
            [_pack_bits(high), _pack_crumbs(q & 3), _pack_q3_scales(f["sc"]), _f16_bytes(f["d"])],
            1,
        )
    if t in (QT.Q4_K, QT.Q5_K):
        q = _u8(f["q"])
        head = [_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), _pack_scale_min_k4(f["sc"], f["m"])]
        if t == QT.Q4_K:
            return torch.cat([*head, _pack_nibbles(q, 32)], 1)
        high = (q >> 4).view(-1, 8, 32).transpose(1, 2).reshape(-1, QK_K)
        return torch.cat([*head, _pack_bits(high), _pack_nibbles(q & 0x0F, 32)], 1)
    if t == QT.Q6_K:
        n = f["q"].shape[0]
        q = _u8(f["q"], 32).view(n, 2, 4, 32)
        low = q & 0x0F
        ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)
        qh = _or_shifted(q >> 4, 2).reshape(n, 64)
        scales = f["sc"].to(torch.int8).view(torch.uint8)
        return torch.cat([ql, qh, scales, _f16_bytes(f["d"])], 1)
    raise ValueError(f"no packer for {qtype.name}")
