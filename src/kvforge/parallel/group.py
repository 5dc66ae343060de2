"""One tensor-parallel group: its rank and size, and the two collectives the layers need.

Layers receive a :class:`TensorParallel` as an argument (no global process-group state); None
means one process. Column-parallel layers split their output features by rank and need no
communication; row-parallel layers split their input features and all-reduce the partial sums;
the vocabulary-parallel embedding all-reduces masked rows and the LM head all-gathers logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kvforge.errors import InvalidRequestError


def shard_range(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """(start, length) of rank's equal share of ``total``; ``what`` names it in the error."""
    if total % size:
        raise InvalidRequestError(
            f"{what} ({total}) is not divisible by the tensor-parallel size {size}",
            "tensor_parallel_size",
        )
    length = total // size
    return rank * length, length


@dataclass(frozen=True)
class TensorParallel:
    """A tensor-parallel group of ``size`` ranks, this process being ``rank``."""

    rank: int
    size: int
    group: Any = None  # torch.distributed ProcessGroup (None: the default group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group (in place; returns ``x``)."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)
