"""GGML block formats, quantizers, tensor-type mixes and importance matrices."""

from kvforge.quant.formats import QT, Unpacked, dequantize, unpack_rows
from kvforge.quant.quantizers import quantize

__all__ = ["QT", "Unpacked", "dequantize", "quantize", "unpack_rows"]
