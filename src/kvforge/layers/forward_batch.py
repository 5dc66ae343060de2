"""ForwardBatch: everything one model forward needs about the batch, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.layers.lora import LoRABatch


@dataclass
class ForwardBatch:
    """Flattened tokens of every scheduled request plus the paging metadata.

    Dimensions: T = tokens this step, B = requests, L = longest sequence (context + new),
    Q = longest query chunk. Tokens are laid out request after request.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64 (padded with 0)
    seq_lens: torch.Tensor  # [B] context + new tokens
    query_lens: torch.Tensor  # [B] new tokens
    query_start_loc: torch.Tensor  # [B] index of each request's first token in [T]
    block_size: int
    max_seq_len: int
    max_query_len: int
    # Adapter slots of the tokens (None: the base model only).
    lora: LoRABatch | None = None
    # Image embeddings that replace token embeddings: (rows in [T], vectors [rows, E]).
    mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
    # Attention backends cache per-batch tensors (masks, gather indices) here, keyed by name.
    attn_cache: dict[object, object] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """T: tokens in the batch."""
        return int(self.input_ids.shape[0])

    @classmethod
    def build(
        cls,
        token_chunks: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> ForwardBatch:
        """Build from per-request new tokens, their first positions and block tables."""
        query_lens = [len(chunk) for chunk in token_chunks]
        seq_lens = [start + n for start, n in zip(start_positions, query_lens)]
        input_ids = [t for chunk in token_chunks for t in chunk]
        positions = [
            p for start, n in zip(start_positions, query_lens) for p in range(start, start + n)
        ]
        max_blocks = max(len(table) for table in block_tables)
        tables = torch.zeros(len(block_tables), max_blocks, dtype=torch.long)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = torch.tensor(table, dtype=torch.long)
        pos = torch.tensor(positions, dtype=torch.long)
        request_index = torch.repeat_interleave(
            torch.arange(len(token_chunks)), torch.tensor(query_lens, dtype=torch.long)
        )
        slots = tables[request_index, pos // block_size] * block_size + pos % block_size
        starts = torch.tensor([0, *query_lens[:-1]], dtype=torch.long).cumsum(0)
        return cls(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=pos.to(device),
            slot_mapping=slots.to(device),
            block_tables=tables.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
            query_lens=torch.tensor(query_lens, dtype=torch.long, device=device),
            query_start_loc=starts.to(device),
            block_size=block_size,
            max_seq_len=max(seq_lens),
            max_query_len=max(query_lens),
        )
