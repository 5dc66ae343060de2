"""On-load weight quantization of float checkpoints (round to nearest, per group or channel).

Like BitsAndBytes in vLLM: a float matrix becomes the common block form as it streams in.
int4 uses groups of 32..256 columns (the int4 kernel's sizes); int8 defaults to one group per
output channel. Symmetric: ``w = s * q`` with q in [-8, 7] / [-127, 127]. Asymmetric:
``w = s * q + m`` with the group's minimum ``m``. fp8: float8_e4m3fn codes with a scale per
output channel (the group's largest magnitude maps to 448), run by ``Fp8Method``.
"""

from __future__ import annotations

import torch

from kvforge.errors import InvalidRequestError
from kvforge.quant.formats import Unpacked

DEFAULT_GROUP_SIZE = {"int4": 128, "int8": -1, "fp8": -1}
FP8_MAX = 448.0  # the largest float8_e4m3fn value


def quantize_rtn(
    weight: torch.Tensor, method: str, group_size: int | None = None, symmetric: bool = True
) -> Unpacked:
    """Quantize a float [rows, cols] matrix; ``group_size`` -1 means one group per row."""
    if method not in DEFAULT_GROUP_SIZE:
        raise InvalidRequestError(
            f"unknown quantization {method!r}; use int8, int4 or fp8", "quantization"
        )
    rows, cols = weight.shape
    group = DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
    group = cols if group == -1 else group
    if group <= 0 or cols % group:
        raise InvalidRequestError(
            f"quantization group size {group} does not divide rows of {cols} values",
            "quantization_group_size",
        )
    x = weight.float().reshape(rows, cols // group, group)
    if method == "fp8":  # dynamic FP8 (e4m3) with a scale per group, as vLLM's fp8 on load
        scale = x.abs().amax(-1) / FP8_MAX
        inv = torch.where(scale > 0, 1 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        codes = (x * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return Unpacked(codes.reshape(rows, cols), scale, None, group)
    bits_max = 7 if method == "int4" else 127
    if symmetric:
        scale = x.abs().amax(-1) / bits_max
        inv = torch.where(scale > 0, 1 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        codes = torch.round(x * inv[..., None]).clamp(-bits_max - 1, bits_max)
        return Unpacked(codes.to(torch.int8).reshape(rows, cols), scale, None, group)
    levels = 15 if method == "int4" else 255
    lo, hi = x.amin(-1), x.amax(-1)
    scale = (hi - lo) / levels
    inv = torch.where(scale > 0, 1 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    codes = torch.round((x - lo[..., None]) * inv[..., None]).clamp(0, levels)
    if method == "int8":  # shift to the signed range: w = s * (q - 128) + (m + 128 s)
        codes, lo = codes - 128, lo + 128 * scale
    return Unpacked(codes.to(torch.int8).reshape(rows, cols), scale, lo, group)
