"""Native CPU code: the C++ ops extension built on first use (paged attention, quantized GEMM,
fused layer ops, quantizer searches) and the torch-free GGUF block library (``ops.blocks``).
Their loaders never raise. The extension's names are imported on first use, so
``kvforge.ops.blocks`` loads without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvforge.ops.extension import ExtensionLoad, cpu_ops, load_extension

__all__ = ["ExtensionLoad", "cpu_ops", "load_extension"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvforge.ops import extension

        return getattr(extension, name)
    raise AttributeError(f"module 'kvforge.ops' has no attribute {name!r}")
