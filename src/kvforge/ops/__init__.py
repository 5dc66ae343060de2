"""C++ CPU ops built on first use (paged attention, quantized GEMM, fused layer ops); the loader
never raises."""

from kvforge.ops.extension import ExtensionLoad, cpu_ops, load_extension

__all__ = ["ExtensionLoad", "cpu_ops", "load_extension"]
