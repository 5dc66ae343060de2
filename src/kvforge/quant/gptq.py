"""Calibrated weight quantization: GPTQ and AWQ on group-wise integer codes.

Both quantize a weight matrix ``W`` [out, in] to ``bits``-bit codes in groups of ``group``
input columns, ``W ~= s * (q - z)`` with q in [0, 2^bits) (GPTQ's grid: symmetric groups use
``z = 2^(bits-1)`` and ``s = 2 max|w| / (2^bits - 1)``, asymmetric ones the group's min / max).
Round-to-nearest on the same grid (:func:`quantize_rtn_grid`) is the baseline both must beat.

- GPTQ (Frantar et al., 2022): visit the columns one by one (optionally by decreasing Hessian
  diagonal, "act-order"), round each, and spread its rounding error over the columns not yet
  visited through the inverse Hessian ``H = X^T X`` of the layer's calibration inputs, in
  blocks of 128 columns (the lazy batch update). Matrices that read the same input (q, k, v;
  gate, up) share ``H`` and are quantized as one stacked matrix: rows are independent.
- AWQ (Lin et al., 2023): scale input channel ``j`` by ``s_j = mean|x_j|^a / mean|w_j|^(1-a)``
  before rounding (salient channels get finer steps) and divide the op that produces the input
  by ``s`` (an RMSNorm weight, the up projection), so the float function is unchanged; ``a`` is
  picked from a grid by the output error on calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """The integer grid: bits, columns per group, symmetric or with zero points."""

    bits: int = 4
    group: int = 128
    symmetric: bool = True

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and integer zero point of each row of ``w`` [out, columns]; the scale is
        rounded to float16, as checkpoints store it, before any code is computed."""
        if self.symmetric:
            amax = w.abs().amax(-1)
            scale = 2 * amax / self.maxq
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
            scale = (high - low) / self.maxq
            zero = torch.round(-low / torch.where(scale > 0, scale, 1)).clamp(0, self.maxq)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
        return scale, zero

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``w`` [out, k] with per-row ``scale`` / ``zero`` ([out] or
        [out, k])."""
        if scale.dim() < w.dim():
            scale, zero = scale[..., None], zero[..., None]
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)


@dataclass
class GroupCodes:
    """``W[:, j] = scales[:, g] * (codes[:, j] - zeros[:, g])`` with ``g = g_idx[j]``."""

    codes: torch.Tensor  # int32 [out, in], 0 .. 2^bits - 1, input column order
    scales: torch.Tensor  # float32 [out, groups] (float16 values)
    zeros: torch.Tensor  # int32 [out, groups]
    g_idx: torch.Tensor  # int32 [in]

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes - self.zeros[:, g]).float()

    def rows(self, start: int, stop: int) -> GroupCodes:
        """The codes of output rows ``start:stop`` (one projection of a stacked matrix)."""
        part = slice(start, stop)
        return GroupCodes(self.codes[part], self.scales[part], self.zeros[part], self.g_idx)


def _check(weight: torch.Tensor, grid: Grid) -> int:
    cols = weight.shape[1]
    group = cols if grid.group == -1 else grid.group
    if group <= 0 or cols % group:
        raise ValueError(f"group size {grid.group} does not divide {cols} input columns")
    return group


def quantize_rtn_grid(weight: torch.Tensor, grid: Grid) -> GroupCodes:
    """Round to nearest on the grid, group by group."""
    group = _check(weight, grid)
    out, cols = weight.shape
    w = weight.float().reshape(out, cols // group, group)
    scale, zero = grid.params(w)
    codes = grid.codes(w, scale, zero).reshape(out, cols)
    g_idx = torch.arange(cols, dtype=torch.int32) // group
    return GroupCodes(codes.to(torch.int32), scale, zero.to(torch.int32), g_idx)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
) -> GroupCodes:
    """GPTQ codes of ``weight`` [out, in] given ``hessian`` [in, in] (``X^T X`` of the
    calibration inputs); ``damp`` adds that fraction of the mean diagonal to it."""
    group = _check(weight, grid)
    w = weight.float().clone()
    out, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    try:  # the upper Cholesky factor of H^-1: its rows spread each column's error
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"the Hessian is not positive definite (raise the damping): {exc}"
        ) from exc
    hinv = hinv.float()
    codes = torch.zeros(out, cols, dtype=torch.int32)
    scales = torch.zeros(out, cols // group)
    zeros = torch.zeros(out, cols // group, dtype=torch.int32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:  # the group's grid from its current (updated) columns
                g = col // group
                span = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :group]
                scale, zero = grid.params(span)
                scales[:, g], zeros[:, g] = scale, zero.to(torch.int32)
            q = grid.codes(w1[:, i], scale, zero)
            codes[:, col] = q.to(torch.int32)
            err = (w1[:, i] - scale * (q - zero)) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    g_idx = torch.arange(cols, dtype=torch.int32) // group
    if perm is not None:  # back to input column order; groups follow the visiting order
        inverse = torch.argsort(perm)
        codes, g_idx = codes[:, inverse], g_idx[inverse]
    return GroupCodes(codes, scales, zeros, g_idx)


def awq_scales(
    weight: torch.Tensor, inputs: torch.Tensor, grid: Grid, steps: int = 20
) -> tuple[torch.Tensor, float]:
    """AWQ's per-input-channel scale for ``weight`` [out, in] (the matrices reading one input,
    stacked) from calibration ``inputs`` [n, in]; also the chosen exponent. ``s`` = 1 (no
    change) is among the candidates, so the result is never worse on ``inputs`` than RTN."""
    x = inputs.float()
    w = weight.float()
    x_mean = x.abs().mean(0)
    group = _check(w, grid)
    wg = w.abs().reshape(w.shape[0], -1, group)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp_min(1e-12)).reshape_as(w).mean(0)
    # the output error ||x (W - W')^T||^2 = sum((D G) * D) with D = W - W' and G = x^T x:
    # [out, in] x [in, in] instead of [n, in] x [in, out] per candidate
    gram = x.T @ x
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for step in range(steps):
        alpha = step / steps
        s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp_min(1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        diff = w - quantize_rtn_grid(w * s, grid).dequantize() / s
        loss = float(((diff @ gram) * diff).sum())
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2]
