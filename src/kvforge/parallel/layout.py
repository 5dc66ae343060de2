"""Where each rank sits: pipeline stage, tensor rank, expert group. Pure arithmetic, no torch.

A stage holds ``S = max(tp, ep)`` consecutive ranks; stage ``s`` is ranks ``s*S .. s*S+S-1``.
Inside a stage, local rank ``l``:

- attention and dense MLPs: tensor rank ``l % tp`` of the group ``l // tp`` (with ``S > tp`` the
  groups are replicas computing the same thing on the same tokens);
- experts: group ``l // (S/ep)`` holds experts ``g*X/ep ..`` whole, split by tensor rank
  ``l % (S/ep)`` within the group; tokens travel between the ranks of the same expert-tensor
  rank (the expert-parallel group, ``ep`` ranks) by all-to-all.

Examples (stage of 2 ranks): tp 2 -> heads and experts split 2 ways; ep 2 (tp 1) -> attention
replicated, experts split whole; tp 2 + ep 2 -> heads split, experts whole on each rank.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Sizes of the three kinds of parallelism."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage."""
        return max(self.tp, self.ep)

    @property
    def world_size(self) -> int:
        """Ranks in all."""
        return self.pp * self.stage_size

    @property
    def expert_tp(self) -> int:
        """Ranks each expert is split over by tensor rank."""
        return self.stage_size // self.ep

    def stage(self, rank: int) -> int:
        """Pipeline stage of ``rank``."""
        return rank // self.stage_size

    def tp_group(self, rank: int) -> list[int]:
        """Ranks sharing ``rank``'s attention heads split (rank order = tensor rank)."""
        first = rank - rank % self.tp
        return list(range(first, first + self.tp))

    def ep_group(self, rank: int) -> list[int]:
        """Ranks exchanging tokens with ``rank`` (one per expert group, in group order)."""
        base = self.stage(rank) * self.stage_size + rank % self.expert_tp
        return [base + g * self.expert_tp for g in range(self.ep)]

    def expert_tp_group(self, rank: int) -> list[int]:
        """Ranks holding the same experts as ``rank``, each a slice of every matrix."""
        first = rank - rank % self.expert_tp
        return list(range(first, first + self.expert_tp))

    def all_groups(self) -> list[tuple[str, list[int]]]:
        """Every group of every kind, in one fixed order (each rank must create all of them,
        in the same order, to take part in its own)."""
        groups: list[tuple[str, list[int]]] = []
        seen: set[tuple[str, tuple[int, ...]]] = set()
        for rank in range(self.world_size):
            for kind, ranks in (
                ("tp", self.tp_group(rank)),
                ("ep", self.ep_group(rank)),
                ("expert_tp", self.expert_tp_group(rank)),
            ):
                if (kind, tuple(ranks)) not in seen:
                    seen.add((kind, tuple(ranks)))
                    groups.append((kind, ranks))
        return groups

    def stage_layers(self, num_layers: int, stage: int) -> tuple[int, int]:
        """Layers [start, end) of ``stage``: an even split, earlier stages taking the extra
        layers (stage 0 also runs the embedding, the final norm and the LM head)."""
        if num_layers < self.pp:
            from kvforge.errors import InvalidRequestError

            raise InvalidRequestError(
                f"{self.pp} pipeline stages need at least as many layers (the model has "
                f"{num_layers})",
                "pipeline_parallel_size",
            )
        base, extra = divmod(num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return start, start + base + (stage < extra)

    def next_stage_rank(self, rank: int) -> int:
        """The rank of the same local index in the next stage (the last stage's next is 0)."""
        return (rank + self.stage_size) % self.world_size

    def prev_stage_rank(self, rank: int) -> int:
        """The rank of the same local index in the previous stage."""
        return (rank - self.stage_size) % self.world_size
