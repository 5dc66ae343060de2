"""Reference attention: gather each request's blocks, pad the batch, one masked SDPA call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvforge.layers.attention.base import BaseAttentionBackend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache


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
        kv_cache: PagedKVCache,
        batch: ForwardBatch,
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """See :meth:`BaseAttentionBackend.forward`."""
        kv_cache.write(key, value, batch.slot_mapping)
        key_slots, mask, query_index, query_valid = _batch_layout(batch, sliding_window)
        keys, values = kv_cache.gather(key_slots, query.dtype)  # [B, L, KVH, D]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, KVH, L, D]
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
