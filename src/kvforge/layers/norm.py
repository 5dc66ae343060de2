"""RMSNorm computed in float32 whatever the activation dtype; fused with the residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.ops import cpu_ops


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``. Gemma's ``(1 + w)`` form is folded into ``weight`` at load.

    On the CPU, 2-D inputs run the C++ ``rms_norm`` / ``add_rms_norm`` (one pass, no
    temporaries); elsewhere the torch ops below, which they match.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension."""
        ops = cpu_ops(x) if x.dim() == 2 else None
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps)  # type: ignore[no-any-return]
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` and its norm, as (normed, new residual); may update ``residual``
        in place, so callers use the returned one."""
        ops = cpu_ops(x) if x.dim() == 2 and residual.is_contiguous() else None
        if ops is not None and x.dtype == residual.dtype:
            return ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = residual + x
        return self(residual), residual
