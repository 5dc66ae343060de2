"""The gated MLP ``down(act(gate(x)) * up(x))`` of dense layers (and MoE shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.config import TransformerConfig
from kvforge.layers.linear import Linear, MergedLinear
from kvforge.layers.lora import LoRABatch
from kvforge.ops import cpu_ops
from kvforge.parallel.group import TensorParallel

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def act_and_mul(gate_up: torch.Tensor, act: object) -> torch.Tensor:
    """``act(gate) * up`` of a fused [N, 2F] gate/up output (the C++ op for SiLU on the CPU,
    outside autograd)."""
    ops = cpu_ops(gate_up) if act is F.silu and gate_up.dim() == 2 else None
    if ops is not None and not gate_up.requires_grad:
        return ops.silu_and_mul(gate_up.contiguous())  # type: ignore[no-any-return]
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up  # type: ignore[operator,no-any-return]


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused; ``size`` overrides F."""

    def __init__(
        self, cfg: TransformerConfig, size: int | None = None, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        size = size or cfg.intermediate_size
        # tensor parallel: gate/up split by output (F / size each), down by input + all-reduce
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {0: size, 1: size}, tp=tp)
        self.down_proj = Linear(size, cfg.hidden_size, tp=tp, split="row")
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        """x: [T, E] -> [T, E]."""
        return self.down_proj(act_and_mul(self.gate_up_proj(x, lora), self.act), lora)
