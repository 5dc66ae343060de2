"""Quantizers for every GGML block type, vectorised over all blocks of a tensor.

The `gguf` package quantizes only the legacy types, without importance weights, so the
K-quants, IQ4_NL and every importance-weighted variant are written here. The searches follow
llama.cpp's ``make_qx_quants`` (symmetric), ``make_qkx2/3_quants`` (scale + min) and
``make_q3_quants``: try a handful of candidate scales per group, re-fit scale (and min) by
weighted least squares on the rounded codes, keep the one with the smallest weighted squared
error.

The searches and the codes run in the C++ extension (csrc/quantize.cpp: tiles of 16 groups,
one per SIMD lane, stay in L1 while all candidates are tried; threads across tiles) when it
builds; the torch versions here define the same maths and are the fallback
(``use_native=False``). Torch evaluates each candidate as a dozen passes over the whole chunk,
which made the searches most of ``kvforge quantize``'s time.

Importance weights ``w`` per element: without an imatrix the magnitude-based weights of
llama.cpp's reference quantizers; with one, ``imatrix[col] * sqrt(sigma2 + x^2)`` where
``sigma2`` is the mean square of the row's block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import ModuleType

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from kvforge.quant.formats import FLOAT_TYPES, IQ4_NL_GRID, QK_K, QT, block_shape, pack_blocks

_EPS = 1e-15
_CHUNK_BLOCKS = 8192  # super-blocks per vectorised chunk (bounds temporary memory)
_MIN_CHUNK_VALUES = 1 << 16  # smaller chunks cost more in Python than a thread gains


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, like C's roundf / llama.cpp's nearest_int."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _f16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _weighted_sums(
    x: torch.Tensor, w: torch.Tensor | None, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    wq = q if w is None else w * q
    return (wq * x).sum(-1), (wq * q).sum(-1)


def native_ops() -> ModuleType | None:
    """kvforge's C++ ops (the searches' fast path) when they build and load, else None."""
    from kvforge.ops.extension import load_extension  # deferred: may build the extension

    return load_extension().module


def search_symmetric(
    x: torch.Tensor,
    w: torch.Tensor | None,
    nmax: int,
    num_steps: int = 9,
    ops: ModuleType | None = None,
) -> torch.Tensor:
    """Best scale per group for codes in [-nmax, nmax-1] (``make_qx_quants``). x, w: [n, g]
    (``w`` None: uniform weights); ``ops``: the C++ ops, else torch."""
    if ops is not None:
        return ops.quant_search_symmetric(x, w, nmax, num_steps)
    amax_idx = x.abs().argmax(-1, keepdim=True)
    signed_max = x.gather(-1, amax_idx)[:, 0]  # [n]
    safe_max = torch.where(signed_max.abs() < _EPS, torch.ones_like(signed_max), signed_max)
    best_scale = torch.zeros_like(signed_max)
    best = torch.full_like(signed_max, -1.0)
    for step in range(-num_steps, num_steps + 1):
        iscale = -(nmax + 0.1 * step) / safe_max
        q = _round(x * iscale[:, None]).clamp(-nmax, nmax - 1)
        sumlx, suml2 = _weighted_sums(x, w, q)
        ok = suml2 > 0
        scale = torch.where(ok, sumlx / suml2.clamp_min(_EPS), torch.zeros_like(sumlx))
        score = scale * sumlx  # = sumlx^2 / suml2, the error reduction of this scale
        better = ok & (score > best)
        best = torch.where(better, score, best)
        best_scale = torch.where(better, scale, best_scale)
    return torch.where(signed_max.abs() < _EPS, torch.zeros_like(best_scale), best_scale)


def search_asymmetric(
    x: torch.Tensor,
    w: torch.Tensor | None,
    nmax: int,
    rmin: float,
    rdelta: float,
    num_steps: int,
    ops: ModuleType | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, min <= 0) per group for codes in [0, nmax] (``make_qkx2_quants``)."""
    if ops is not None:
        return ops.quant_search_asymmetric(x, w, nmax, rmin, rdelta, num_steps)
    if w is None:
        w = torch.ones_like(x)
    lo = x.min(-1).values.clamp(max=0.0)
    hi = x.max(-1).values
    span = (hi - lo).clamp_min(_EPS)
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = _round(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = det.abs() > _EPS
        scale = torch.where(
            safe, (sum_w * sum_xl - sum_x * sum_l) / det.where(safe, 1.0), 1 / iscale
        )
        minimum = torch.where(safe, (sum_l2 * sum_x - sum_l * sum_xl) / det.where(safe, 1.0), lo)
        positive = minimum > 0
        scale = torch.where(positive, sum_xl / sum_l2.clamp_min(_EPS), scale)
        minimum = torch.where(positive, torch.zeros_like(minimum), minimum)
        err = (w * (scale[:, None] * q + minimum[:, None] - x) ** 2).sum(-1)
        return scale, minimum, err

    best_scale, best_min = span / nmax, lo
    q0 = _round((x - lo[:, None]) / best_scale[:, None]).clamp(0, nmax)
    best_err = (w * (best_scale[:, None] * q0 + lo[:, None] - x) ** 2).sum(-1)
    for step in range(num_steps + 1):
        scale, minimum, err = fit((rmin + rdelta * step + nmax) / span)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, minimum, best_min)
    flat = (hi - lo) < _EPS
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_min = torch.where(flat, lo, best_min)
    return best_scale, best_min


def _codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    lo: int,
    hi: int,
    ops: ModuleType | None,
) -> torch.Tensor:
    """Codes clamp(round((x - minimum) / scale), lo, hi) of groups x [n, g] (0 where scale is 0):
    int8 from the C++ ops, float from torch."""
    if ops is not None:
        return ops.quant_codes(x, scale, minimum, lo, hi)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale.where(scale != 0, 1.0))
    shifted = x if minimum is None else x - minimum[..., None]
    return _round(shifted * inv[..., None]).clamp(lo, hi)


# ------------------------------------------------------------------ per-type block quantizers
# Each takes blocks x [n, block], weights w [n, block] (float32; None: uniform) and the C++ ops
# (None: torch), returns packed bytes.
Quantizer = Callable[[torch.Tensor, torch.Tensor | None, ModuleType | None], torch.Tensor]


def _q8_0(x: torch.Tensor, w: torch.Tensor | None, ops: ModuleType | None) -> torch.Tensor:
    lo, hi = torch.aminmax(x, dim=-1)  # one pass, where abs().max() takes two
    d = _f16_round(torch.maximum(-lo, hi) / 127) + 0.0  # + 0: scale +0 for zeros of any sign
    return pack_blocks(QT.Q8_0, d=d, q=_codes(x, d, None, -127, 127, ops))


def _legacy_sym(qtype: GGMLQuantizationType, nmax: int) -> Quantizer:
    def quantize(x: torch.Tensor, w: torch.Tensor | None, ops: ModuleType | None) -> torch.Tensor:
        d = _f16_round(search_symmetric(x, w, nmax, ops=ops))
        return pack_blocks(qtype, d=d, q=_codes(x, d, None, -nmax, nmax - 1, ops) + nmax)

    return quantize


def _legacy_asym(qtype: GGMLQuantizationType, nmax: int) -> Quantizer:
    def quantize(x: torch.Tensor, w: torch.Tensor | None, ops: ModuleType | None) -> torch.Tensor:
        scale, minimum = search_asymmetric(x, w, nmax, -0.9, 0.05, 36, ops)
        d, m = _f16_round(scale), _f16_round(minimum)
        return pack_blocks(qtype, d=d, m=m, q=_codes(x, d, m, 0, nmax, ops))

    return quantize


def _iq4_nl(x: torch.Tensor, w: torch.Tensor | None, ops: ModuleType | None) -> torch.Tensor:
    """IQ4_NL (torch only: a fallback type of Q2_K / Q3_K mixes, off the common paths)."""
    if w is None:
        w = torch.ones_like(x)
    grid = torch.tensor(IQ4_NL_GRID, dtype=torch.float32)
    mids = (grid[1:] + grid[:-1]) / 2

    def nearest(v: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(v.contiguous(), mids)

    amax_idx = x.abs().argmax(-1, keepdim=True)
    signed_max = x.gather(-1, amax_idx)[:, 0]
    safe_max = torch.where(signed_max.abs() < _EPS, torch.ones_like(signed_max), signed_max)
    best_d = torch.zeros_like(signed_max)
    best = torch.full_like(signed_max, -1.0)
    for step in range(-7, 8):
        inv = (step + grid[0]) / safe_max
        q = grid[nearest(x * inv[:, None])]
        sumqx, sumq2 = _weighted_sums(x, w, q)
        d = sumqx / sumq2.clamp_min(_EPS)
        better = (sumq2 > 0) & (d * sumqx > best)
        best, best_d = torch.where(better, d * sumqx, best), torch.where(better, d, best_d)
    d = _f16_round(best_d)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d.where(d != 0, 1.0))
    return pack_blocks(QT.IQ4_NL, d=d, q=nearest(x * inv[:, None]))


def _super_scales(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative per-group values [n, G] to ``levels`` steps of one f16 scale."""
    top = values.max(-1).values
    d = _f16_round(top / levels)
    inv = torch.where(d > 0, levels / top.clamp_min(_EPS), torch.zeros_like(d))
    return d, _round(values * inv[:, None]).clamp(0, levels)


def _k_scale_min(
    qtype: GGMLQuantizationType,
    group: int,
    nmax: int,
    levels: int,
    search: tuple[float, float, int],
) -> Quantizer:
    """Q2_K / Q4_K / Q5_K: per-group scale and min, each quantized against a super-block scale."""

    def quantize(x: torch.Tensor, w: torch.Tensor | None, ops: ModuleType | None) -> torch.Tensor:
        n = x.shape[0]
        xg, wg = x.view(-1, group), None if w is None else w.view(-1, group)
        scale, minimum = search_asymmetric(xg, wg, nmax, *search, ops=ops)
        d, sc = _super_scales(scale.view(n, -1).clamp_min(0), levels)
        dmin, m = _super_scales((-minimum).view(n, -1), levels)
        eff_scale = (d[:, None] * sc).view(-1)
        eff_min = -(dmin[:, None] * m).view(-1)
        q = _codes(xg, eff_scale, eff_min, 0, nmax, ops).view(n, QK_K)
        return pack_blocks(qtype, d=d, dmin=dmin, sc=sc, m=m, q=q)

    return quantize


def _k_symmetric(qtype: GGMLQuantizationType, nmax: int, levels: int) -> Quantizer:
    """Q3_K / Q6_K: signed per-16 scales quantized against one f16 super-block scale."""

    def quantize(x: torch.Tensor, w: torch.Tensor | None, ops: ModuleType | None) -> torch.Tensor:
        n = x.shape[0]
        xg, wg = x.view(-1, 16), None if w is None else w.view(-1, 16)
        scales = search_symmetric(xg, wg, nmax, ops=ops).view(n, 16)
        idx = scales.abs().argmax(-1, keepdim=True)
        signed_max = scales.gather(-1, idx)[:, 0]
        safe = signed_max.abs() > _EPS
        iscale = torch.where(
            safe, -levels / signed_max.where(safe, 1.0), torch.zeros_like(signed_max)
        )
        sc = _round(iscale[:, None] * scales).clamp(-levels, levels - 1)
        d = _f16_round(torch.where(safe, 1 / iscale.where(safe, 1.0), torch.zeros_like(iscale)))
        q = _codes(xg, (d[:, None] * sc).view(-1), None, -nmax, nmax - 1, ops).view(n, QK_K)
        return pack_blocks(qtype, d=d, sc=sc, q=q)

    return quantize


_QUANTIZERS: dict[GGMLQuantizationType, Quantizer] = {
    QT.Q8_0: _q8_0,
    QT.Q4_0: _legacy_sym(QT.Q4_0, 8),
    QT.Q5_0: _legacy_sym(QT.Q5_0, 16),
    QT.Q4_1: _legacy_asym(QT.Q4_1, 15),
    QT.Q5_1: _legacy_asym(QT.Q5_1, 31),
    QT.IQ4_NL: _iq4_nl,
    QT.Q2_K: _k_scale_min(QT.Q2_K, 16, 3, 15, (-0.5, 0.1, 15)),
    QT.Q4_K: _k_scale_min(QT.Q4_K, 32, 15, 63, (-0.9, 0.05, 36)),
    QT.Q5_K: _k_scale_min(QT.Q5_K, 32, 31, 63, (-0.9, 0.05, 36)),
    QT.Q3_K: _k_symmetric(QT.Q3_K, 4, 32),
    QT.Q6_K: _k_symmetric(QT.Q6_K, 32, 128),
}
_SYMMETRIC_WEIGHTED = {QT.Q8_0, QT.Q3_K, QT.Q6_K, QT.IQ4_NL}


def _weights(
    x: torch.Tensor, qtype: GGMLQuantizationType, imatrix: torch.Tensor | None
) -> torch.Tensor | None:
    """Importance of each element of blocks x [n, block] (imatrix: [n, block] per-column);
    None for uniform weights, and for Q8_0, whose scale is no search."""
    sub = 16 if qtype in (QT.Q2_K, QT.Q3_K, QT.Q6_K) else 32
    if qtype == QT.Q8_0:
        return None
    if imatrix is not None:
        sigma2 = (x * x).mean(-1, keepdim=True)
        return imatrix * torch.sqrt(sigma2 + x * x)
    if qtype in (QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1):
        return None
    if qtype in _SYMMETRIC_WEIGHTED:
        return x * x + 1e-12
    if qtype == QT.Q2_K:
        return x.abs() + 1e-12
    # llama.cpp's reference K-quant weights: the group's RMS plus |x|.
    rms = (x * x).view(x.shape[0], -1, sub).mean(-1, keepdim=True).sqrt()
    return (rms + x.view(x.shape[0], -1, sub).abs()).view_as(x)


@contextmanager
def _serial_torch_ops() -> Iterator[int]:
    """Torch's intra-op threads off for the block (yields how many there were).

    Each torch op is a parallel region whose threads meet at a barrier; on cores shared with
    other processes every barrier waits out a descheduled thread, and the quantizers' many small
    ops ran 5-10x slower on 2 threads than on one. Chunks run in a thread pool instead.
    NOTE: the setting is process-wide: meant for the offline tools (quantize, convert, merge)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield num_threads
    finally:
        torch.set_num_threads(num_threads)


def quantize(
    data: np.ndarray | torch.Tensor,
    qtype: GGMLQuantizationType,
    imatrix: np.ndarray | torch.Tensor | None = None,
    use_native: bool = True,
) -> np.ndarray:
    """Quantize a float tensor [..., cols] to ``qtype``: uint8 [..., row bytes] (or float data).

    ``imatrix`` holds one importance value per column (llama.cpp's in_sum2 / counts).
    ``use_native=False`` runs the torch searches even where the C++ extension loads.
    """
    if qtype in FLOAT_TYPES:
        x = torch.as_tensor(np.array(data, dtype=np.float32))  # a copy: never alias ``data``
        if qtype == QT.BF16:
            return gguf_quants.quantize(x.numpy(), qtype)
        return x.to(torch.float16 if qtype == QT.F16 else torch.float32).numpy()
    if qtype not in _QUANTIZERS:
        raise ValueError(f"quantization to {qtype.name} is not supported")
    array = np.asarray(data, dtype=np.float32)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array)  # torch.from_numpy needs writable memory (a file's memmap is not)
    x = torch.from_numpy(array)  # read only: the quantizers never write to x
    block, size = block_shape(qtype)
    cols = x.shape[-1]
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values, got {cols}")
    rows = x.reshape(-1, cols)
    imp = None
    if imatrix is not None:
        imp = torch.as_tensor(np.asarray(imatrix, dtype=np.float32)).reshape(1, cols)
    out = torch.empty(rows.shape[0], cols // block * size, dtype=torch.uint8)
    fn = _QUANTIZERS[qtype]
    ops = native_ops() if use_native else None

    def run(start: int, stop: int) -> None:
        blocks = rows[start:stop].reshape(-1, block)
        chunk_imp = None if imp is None else imp.expand(stop - start, cols).reshape(-1, block)
        packed = fn(blocks, _weights(blocks, qtype, chunk_imp), ops)
        out[start:stop] = packed.view(stop - start, -1)

    with _serial_torch_ops() as num_threads:
        # at least one chunk per thread (tensors of 64k values and more), ops serial within
        rows_per_chunk = max(
            1,
            min(_CHUNK_BLOCKS * QK_K, max(_MIN_CHUNK_VALUES, rows.numel() // num_threads)) // cols,
        )
        starts = range(0, rows.shape[0], rows_per_chunk)
        bounds = [(start, min(start + rows_per_chunk, rows.shape[0])) for start in starts]
        if num_threads == 1 or len(bounds) == 1:
            for start, stop in bounds:
                run(start, stop)
        else:
            with ThreadPoolExecutor(min(num_threads, len(bounds))) as pool:
                list(pool.map(lambda bound: run(*bound), bounds))
    return out.reshape(*x.shape[:-1], -1).numpy()
