"""One tensor-parallel group: its rank and size, and the two collectives the layers need.

Layers receive a :class:`TensorParallel` as an argument (no global process-group state); None
means one process. Column-parallel layers split their output features by rank and need no
communication; row-parallel layers split their input features and all-reduce the partial sums;
the vocabulary-parallel embedding all-reduces masked rows and the LM head all-gathers logits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kvforge.errors import InvalidRequestError
from kvforge.parallel.layout import Layout


def shard_range(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """(start, length) of rank's equal share of ``total``; ``what`` names it in the error."""
    kind = "expert-parallel" if what == "experts" else "tensor-parallel"
    if total % size:
        raise InvalidRequestError(
            f"{what} ({total}) is not divisible by the {kind} size {size}",
            f"{kind.replace('-', '_')}_size",
        )
    length = total // size
    return rank * length, length


# Bytes this process sent into collectives and point-to-point transfers, by kind ("tp", "ep",
# "pp", ...): what benchmarks/parallel.py reads to report traffic per token and layer. An
# all-reduce or all-gather counts its input once (what a ring moves per rank is about
# 2 (n-1)/n of that).
TRAFFIC: Counter[str] = Counter()


def _count(kind: str, x: torch.Tensor) -> None:
    TRAFFIC[kind] += x.numel() * x.element_size()


@dataclass(frozen=True)
class TensorParallel:
    """A tensor-parallel group of ``size`` ranks, this process being ``rank``."""

    rank: int
    size: int
    group: Any = None  # torch.distributed ProcessGroup (None: the default group)
    kind: str = "tp"  # the TRAFFIC counter it adds to

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group (in place; returns ``x``)."""
        _count(self.kind, x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order."""
        x = x.contiguous()
        _count(self.kind, x)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(
        self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """Rows of ``x`` sent in rank order (``send_counts[r]`` to rank r); returns the rows
        received, ``recv_counts[r]`` from rank r, in rank order."""
        x = x.contiguous()
        _count(self.kind, x)
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x, recv_counts, send_counts, group=self.group)
        return out


@dataclass(frozen=True)
class ExpertParallel:
    """How a rank's mixture-of-experts layers split: ``ep`` exchanges tokens between expert
    groups (rank g holds experts g*X/size ..), ``tp`` splits each expert's matrices (None: whole).
    ``record_stats``: this rank counts routed tokens (one rank per token slice, so the sum over
    ranks is the true count)."""

    ep: TensorParallel | None
    tp: TensorParallel | None
    capacity_factor: float | None = None
    record_stats: bool = True


@dataclass(frozen=True)
class ModelShard:
    """The part of the model one rank builds: its tensor split, its experts, its layers."""

    tp: TensorParallel | None = None
    experts: ExpertParallel | None = None
    layers: tuple[int, int] | None = None  # [start, end) of a pipeline stage (None: all)


@dataclass(frozen=True)
class RankContext:
    """One rank of a split model: where it sits, what it builds, how it talks to its pipeline
    neighbours."""

    layout: Layout
    rank: int
    shard: ModelShard
    micro_batches: int = 1  # per step, under pipeline parallelism
    control: Any = None  # the gloo group step messages travel on (no timeout while idle)

    @property
    def is_driver(self) -> bool:
        """Rank 0: holds the engine's pipe, samples, answers."""
        return self.rank == 0

    @property
    def first_stage(self) -> bool:
        """Whether this rank runs the embedding, final norm and LM head."""
        return self.layout.stage(self.rank) == 0

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` any rank holds (e.g. KV blocks that fit everywhere)."""
        x = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return int(x.item())

    def send_hidden(self, hidden: torch.Tensor, tag: int) -> Any:
        """Send a micro-batch's hidden states to the next stage (the last stage: to the
        first); returns the pending send."""
        hidden = hidden.contiguous()
        _count("pp", hidden)
        return dist.isend(hidden, self.layout.next_stage_rank(self.rank), tag=tag)

    def recv_hidden(
        self, rows: int, width: int, dtype: torch.dtype, tag: int, device: torch.device
    ) -> torch.Tensor:
        """The previous stage's hidden states [rows, width] of a micro-batch."""
        out = torch.empty(rows, width, dtype=dtype, device=device)
        dist.recv(out, self.layout.prev_stage_rank(self.rank), tag=tag)
        return out
