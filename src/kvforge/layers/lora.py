"""The LoRA seam of the linear layers: a batch that mixes adapters and the base model.

Every linear a LoRA may target holds ``LoRASlots``: for each of ``num_slots`` adapter slots a
stacked ``A`` [num_shards * R, in] and a block-diagonal ``B`` [out, num_shards * R] (R =
``max_lora_rank``; a fused q/k/v or gate/up linear gives each shard its own R rows of ``A`` and
its own rows and columns of ``B``, zero where an adapter leaves a shard out; the adapter's scaling
is folded into ``B``). A forward's ``LoRABatch`` groups its tokens by slot, and each linear adds
``(x_s A_s^T) B_s^T`` to the rows of slot ``s``: one gather and two matmuls per adapter present
in the batch (a segmented GEMM in the manner of Punica's SGMV), nothing for base-model tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.ops import cpu_ops


@dataclass
class LoRABatch:
    """The adapter slots of one forward: ``token_slots`` [T] int64 (-1: the base model),
    ``slots`` the distinct slots present. ``single`` is the slot of every token when one adapter
    covers the whole batch."""

    token_slots: torch.Tensor
    slots: list[int]
    single: int | None
    # per stack width W: [T, (max slot + 1) * W] ones where a token's own slot's columns are
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_token_slots(cls, token_slots: torch.Tensor) -> LoRABatch | None:
        """Group tokens by slot; None when no token has an adapter."""
        present = sorted(set(token_slots.unique().tolist()) - {-1})
        if not present:
            return None
        single = present[0] if len(present) == 1 and bool((token_slots >= 0).all()) else None
        return cls(token_slots, present, single)

    @property
    def num_slots(self) -> int:
        """Slots 0 .. max present (the stacks' leading part the batch needs)."""
        return self.slots[-1] + 1

    def mask(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, num_slots * width]: 1 on each token's own slot's ``width`` columns, else 0."""
        mask = self._masks.get(width)
        if mask is None:
            columns = torch.arange(self.num_slots * width, device=self.token_slots.device)
            mask = (columns[None, :] // width == self.token_slots[:, None]).to(dtype)
            self._masks[width] = mask
        return mask


class LoRASlots:
    """Adapter slots of one linear layer (see the module docstring)."""

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        in_features: int,
        shard_sizes: list[int],
        device: torch.device,
    ) -> None:
        self.max_rank = max_rank
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes
        self.width = len(shard_sizes) * max_rank
        # A stacked [slots, W, in] and B transposed [slots, W, out]: slot s's columns of the
        # flattened [slots * W, ...] views are rows s*W .. (s+1)*W.
        self.a = torch.zeros(num_slots, self.width, in_features, device=device)
        self.bt = torch.zeros(num_slots, self.width, sum(shard_sizes), device=device)

    def set(self, slot: int, shard: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Put one shard's ``A`` [r, in] and scaled ``B`` [shard out, r] into ``slot``."""
        rank = a.shape[0]
        column = shard * self.max_rank
        offset, size = self.shard_offsets[shard], self.shard_sizes[shard]
        self.a[slot, column : column + rank].copy_(a)
        self.bt[slot, column : column + rank, offset : offset + size].copy_(b.t())

    def clear(self, slot: int) -> None:
        """Empty ``slot`` (the adapter's update becomes zero)."""
        self.a[slot].zero_()
        self.bt[slot].zero_()

    def apply(self, x: torch.Tensor, y: torch.Tensor, lora: LoRABatch) -> torch.Tensor:
        """``y`` plus each token's adapter update; x [T, in], y [T, out].

        On the CPU the C++ ``lora_apply_`` does it per token, reading only that token's
        adapter. Elsewhere every token goes through the A of every slot up to the batch's last
        (one matmul), the columns of other slots are zeroed, and one matmul with the stacked B
        adds the update: three ops per layer whatever the mix of adapters.
        """
        x = x.to(self.a.dtype)
        ops = cpu_ops(y)
        if ops is not None and y.dtype == x.dtype == torch.float32:
            y = y.contiguous()
            ops.lora_apply_(y, x.contiguous(), self.a, self.bt, lora.token_slots)
            return y
        if lora.single is not None:
            shrunk = x @ self.a[lora.single].t()
            return (
                torch.addmm(y, shrunk, self.bt[lora.single])
                if y.dtype == x.dtype
                else (y + (shrunk @ self.bt[lora.single]).to(y.dtype))
            )
        n = lora.num_slots
        shrunk = (x @ self.a[:n].reshape(n * self.width, -1).t()) * lora.mask(self.width, x.dtype)
        expanded = self.bt[:n].reshape(n * self.width, -1)
        if y.dtype == x.dtype:
            return torch.addmm(y, shrunk, expanded)
        return y + (shrunk @ expanded).to(y.dtype)
