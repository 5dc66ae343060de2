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
        """cos and sin, each [T, head_dim], for float32 positions ``positions`` [T]."""
        inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, heads, head_dim] by cos/sin [T, head_dim] (NeoX layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)
