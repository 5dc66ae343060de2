"""CPU paged attention: a C++ kernel that reads each request's KV blocks in place.

Dimensions: T new tokens, B requests, H query heads, KVH KV heads, D head dim.

Unlike ``torch_ref`` (which gathers every request's context into a padded [B, L, KVH, D] copy
and a [B, Q, L] mask per layer), the kernel walks each request's block table: for every query
row, out = sum_j softmax(scale * q.k_j) v_j over its causal (and sliding-window) keys, as a
block-wise online softmax in float32, with the G = H / KVH query heads of a KV head sharing each
K/V tile, and split-K over long contexts when there are few requests. See
``kvforge/csrc/paged_attention.cpp`` for the maths.

KV formats: 16/32-bit caches (any of float32 / bfloat16 / float16, also differing from the
query dtype) and the one-byte caches (``fp8_e4m3``, ``fp8_e5m2``, ``int8``): their per-channel
scales and means fold into the query and the output (q.k = t (q ⊙ s_k).k~ + q.c_k; out =
s_v ⊙ sum_j p_j t_j v~_j / l + c_v, t being int8's per-token scale), and blocks with an exact
16-bit copy in :class:`RecentBlocks` are read from that copy. Nothing falls back to torch.
"""

from __future__ import annotations

from typing import Any

import torch

from kvforge.layers.attention.base import BaseAttentionBackend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache
from kvforge.ops.extension import load_extension


def _quantized_args(kv_cache: PagedKVCache) -> dict[str, Any]:
    """The one-byte format's scales, means and recent copies as the kernel's arguments."""
    if not kv_cache.is_quantized:
        return {}
    _, _, num_kv_heads, head_dim = kv_cache.k.shape
    scales = kv_cache.scales

    def channels(x: torch.Tensor | None) -> torch.Tensor | None:
        # [KVH, D] float32 (default scales are a broadcast [1])
        return None if x is None else x.float().expand(num_kv_heads, head_dim).contiguous()

    args: dict[str, Any] = {
        "k_scale": channels(scales.k),
        "v_scale": channels(scales.v),
        "k_center": channels(scales.k_center),
        "v_center": channels(scales.v_center),
        "k_token_scale": kv_cache.k_token_scale,
        "v_token_scale": kv_cache.v_token_scale,
    }
    if kv_cache.recent is not None and kv_cache.recent_k is not None:
        args["recent_slot_of_block"] = kv_cache.recent.slot_of_block
        args["recent_k"] = kv_cache.recent_k
        args["recent_v"] = kv_cache.recent_v
    return args


class CpuPagedAttentionBackend(BaseAttentionBackend):
    """Attention over the paged cache in place with the C++ kernel (CPU tensors only)."""

    def __init__(self) -> None:
        loaded = load_extension()
        if loaded.module is None:
            raise RuntimeError(f"the cpu_paged attention backend is unavailable: {loaded.error}")
        self._ops = loaded.module

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
        """See :meth:`BaseAttentionBackend.forward`."""
        kv_cache.write(key, value, batch.slot_mapping)
        return self._ops.paged_attention(
            query,  # [T, H, D]
            kv_cache.k,  # [num_blocks, block_size, KVH, D]
            kv_cache.v,
            batch.block_tables,  # [B, max_blocks]
            batch.seq_lens,  # [B]
            batch.query_lens,
            batch.query_start_loc,
            scale,
            sliding_window or 0,
            **_quantized_args(kv_cache),
        )  # [T, H, D]
