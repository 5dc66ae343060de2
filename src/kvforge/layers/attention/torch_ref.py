"""Reference attention: gather each request's blocks, pad the batch, one masked SDPA call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvforge.layers.attention.base import BaseAttentionBackend
from kvforge.layers.forward_batch import ForwardBatch


def _batch_layout(batch: ForwardBatch, sliding_window: int | None) -> tuple[torch.Tensor, ...]:
    """Gather indices and masks shared by every layer with the same window (cached)."""
    cached = batch.attn_cache.get(("torch_ref", sliding_window))
    if cached is not None:
        return cached  # type: ignore[return-value]
    device = batch.input_ids.device
    size = batch.block_size
    key_pos = torch.arange(batch.max_seq_len, device=device)  # [L]
    query_off = torch.arange(batch.max_query_len, device=device)  # [Q]
    # [B, L] flat cache slot of every context position (padding reads slot of block 0)
    blocks = batch.block_tables.gather(
        1,
        (key_pos // size)
        .expand(batch.block_tables.shape[0], -1)
        .clamp(max=batch.block_tables.shape[1] - 1),
    )
    key_slots = blocks * size + key_pos % size
    query_valid = query_off[None, :] < batch.query_lens[:, None]  # [B, Q]
    query_pos = (batch.seq_lens - batch.query_lens)[:, None] + query_off[None, :]  # [B, Q]
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (
        key_pos[None, None, :] < batch.seq_lens[:, None, None]
    )  # [B, Q, L]
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window
    # Padded query rows attend to position 0 so SDPA never sees an all-masked row.
    mask[:, :, 0] |= ~query_valid
    query_index = (batch.query_start_loc[:, None] + query_off[None, :]).clamp(
        max=batch.num_tokens - 1
    )
    layout = (key_slots, mask.unsqueeze(1), query_index, query_valid)
    batch.attn_cache[("torch_ref", sliding_window)] = layout
    return layout


class TorchRefAttentionBackend(BaseAttentionBackend):
    """CPU-friendly reference backend and the ground truth for faster ones in tests."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """See :meth:`BaseAttentionBackend.forward`."""
        k_cache, v_cache = kv_cache
        num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, KVH, D]
        v_flat = v_cache.view(-1, num_kv_heads, v_cache.shape[-1])
        k_flat.index_copy_(0, batch.slot_mapping, key.to(k_flat.dtype))
        v_flat.index_copy_(0, batch.slot_mapping, value.to(v_flat.dtype))
        key_slots, mask, query_index, query_valid = _batch_layout(batch, sliding_window)
        keys = k_flat[key_slots].transpose(1, 2).to(query.dtype)  # [B, KVH, L, D]
        values = v_flat[key_slots].transpose(1, 2).to(query.dtype)
        queries = query[query_index].transpose(1, 2)  # [B, H, Q, D]
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            scale=scale,
            enable_gqa=queries.shape[1] != keys.shape[1],
        )  # [B, H, Q, D]
        return out.transpose(1, 2)[query_valid]  # [T, H, D]
