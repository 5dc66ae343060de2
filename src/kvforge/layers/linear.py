"""Linear layers whose parameters load through ``weight_loader`` (fusing q/k/v, gate/up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """``y = x W^T (+ b)``; ``W`` is [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer."""
        return F.linear(x, self.weight, self.bias)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: object = None
    ) -> None:
        """Copy a checkpoint tensor into ``param``."""
        if param.shape != loaded.shape:
            raise ValueError(
                f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}"
            )
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

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: object = None
    ) -> None:
        """Copy one shard's tensor into its rows."""
        offset, size = self.shard_offsets[shard]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shard {shard!r}: expected {(size, *param.shape[1:])}, got {tuple(loaded.shape)}"
            )
        param.data[offset : offset + size].copy_(loaded)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Split a fused output back into its shards."""
        return list(y.split([size for _, size in self.shard_offsets.values()], dim=-1))
