"""C++ CPU ops built on first use (paged attention, quantized GEMM); the loader never raises."""

from kvforge.ops.extension import ExtensionLoad, load_extension, load_paged_attention

__all__ = ["ExtensionLoad", "load_extension", "load_paged_attention"]
