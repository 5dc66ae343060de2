"""Rotary position embeddings (NeoX half-rotation layout) with Llama 3 and linear scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from kvforge.errors import UnsupportedModelError


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, object]) -> torch.Tensor:
    factor = float(scaling["factor"])  # type: ignore[arg-type]
    low = float(scaling.get("low_freq_factor", 1.0))  # type: ignore[arg-type]
    high = float(scaling.get("high_freq_factor", 4.0))  # type: ignore[arg-type]
    old_len = float(scaling.get("original_max_position_embeddings", 8192))  # type: ignore[arg-type]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for positions once per forward; layers apply them to q and k."""

    def __init__(self, head_dim: int, base: float, scaling: dict[str, object] | None = None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (
            base
            ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
        )
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "llama3":
            assert scaling is not None
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind == "linear":
            assert scaling is not None
            inv_freq = inv_freq / float(scaling["factor"])  # type: ignore[arg-type]
        elif kind not in ("default", None):
            raise UnsupportedModelError(f"rope scaling {kind!r} is not supported")
        self._inv_freq = inv_freq  # plain attribute: survives building on the meta device

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, each [T, 1, head_dim], for positions ``positions`` [T].

        The sin's first half is negated so that :func:`apply_rotary` needs no negation:
        ``rotate_half(x) * sin == roll(x, D/2) * signed_sin``.
        """
        inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
        sin = freqs.sin()
        cos = freqs.cos()
        return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, heads, head_dim] by cos / signed sin [T, 1, head_dim] (NeoX layout):
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``."""
    half = x.shape[-1] // 2
    out = torch.addcmul(x * cos, x.roll(half, dims=-1), signed_sin)
    return out if out.dtype == x.dtype else out.to(x.dtype)
