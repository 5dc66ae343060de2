"""Attention backend interface and registry."""

from __future__ import annotations

import functools
import importlib
import logging
from abc import ABC, abstractmethod

import torch

from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache

logger = logging.getLogger(__name__)

# name -> "module:Class", imported only when chosen
_BACKENDS: dict[str, str] = {
    "torch_ref": "kvforge.layers.attention.torch_ref:TorchRefAttentionBackend",
    "cpu_paged": "kvforge.layers.attention.cpu_paged:CpuPagedAttentionBackend",
}


class BaseAttentionBackend(ABC):
    """Writes a layer's new K/V into the paged cache and attends over the cached context."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: PagedKVCache,
        batch: ForwardBatch,
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Attention of the batch's new tokens.

        query: [T, H, D]; key, value: [T, KVH, D]; kv_cache: the layer's paged K and V,
        each [num_blocks, block_size, KVH, D], written and read through its methods. Returns [T, H, D]. Each query attends causally to its
        request's cached context and to the new tokens up to itself, within ``sliding_window``
        most recent positions (itself included) when given.
        """


def register_attention_backend(name: str, target: str) -> None:
    """Register a backend as ``"module:Class"`` (imported lazily)."""
    _BACKENDS[name] = target


def create_attention_backend(name: str = "torch_ref") -> BaseAttentionBackend:
    """Instantiate a registered attention backend."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    module_name, class_name = _BACKENDS[name].split(":")
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    return backend_cls()


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The registered backend to create for ``name``: ``"auto"`` is ``"cpu_paged"`` on a CPU
    device when its C++ extension builds and loads, else ``"torch_ref"``; any other name is
    returned as it is."""
    if name != "auto":
        return name
    return _auto_backend(device.type)


@functools.cache
def _auto_backend(device_type: str) -> str:
    """The "auto" choice for a device type, logged once per process."""
    reason: str | None
    if device_type != "cpu":
        chosen, reason = "torch_ref", f"no paged attention kernel for {device_type} devices"
    else:
        from kvforge.ops.extension import load_extension  # deferred: may build the extension

        error = load_extension().error
        chosen = "torch_ref" if error is not None else "cpu_paged"
        reason = None if error is None else f"paged attention extension unavailable: {error}"
    if reason is None:
        logger.info("attention backend: %s", chosen)
    else:
        logger.info("attention backend: %s (%s)", chosen, reason)
    return chosen
