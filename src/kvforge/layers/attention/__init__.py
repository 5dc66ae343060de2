"""Attention backends: an ABC, a registry and the torch reference backend."""

from kvforge.layers.attention.base import (
    BaseAttentionBackend,
    create_attention_backend,
    register_attention_backend,
    resolve_attention_backend,
)

__all__ = [
    "BaseAttentionBackend",
    "create_attention_backend",
    "register_attention_backend",
    "resolve_attention_backend",
]
