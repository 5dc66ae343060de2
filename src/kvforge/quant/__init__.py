"""GGML block formats, quantizers, tensor-type mixes and importance matrices.

The names below are imported on first use: ``kvforge.quant.mixes`` and the GGUF file tools
load without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvforge.quant.formats import QT, Unpacked, dequantize, unpack_rows
    from kvforge.quant.quantizers import quantize

__all__ = ["QT", "Unpacked", "dequantize", "quantize", "unpack_rows"]


def __getattr__(name: str) -> Any:
    if name == "quantize":
        from kvforge.quant.quantizers import quantize

        return quantize
    if name in __all__:
        from kvforge.quant import formats

        return getattr(formats, name)
    raise AttributeError(f"module 'kvforge.quant' has no attribute {name!r}")
