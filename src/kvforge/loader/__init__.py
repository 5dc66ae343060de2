"""Model loading from GGUF files and Hugging Face directories into :class:`DecoderLM`.

``load_model`` is imported on first use: the GGUF header checks (``loader.gguf_check``) load
without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvforge.loader.model_loader import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvforge.loader import model_loader

        return getattr(model_loader, name)
    raise AttributeError(f"module 'kvforge.loader' has no attribute {name!r}")
