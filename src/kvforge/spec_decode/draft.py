"""Draft-model proposer: a small model sharing the target's vocabulary proposes k tokens.

Its KV cache mirrors the target's block for block: it has the same number of blocks and writes
a token's KV at the slot where the target writes it. Block tables, allocation, copy-on-write,
prefix caching, preemption and the rollback of rejected drafts therefore hold for the draft's KV
with no block bookkeeping of its own.

Each request's runner state keeps ``draft_computed``: its leading positions whose draft KV is
written (valid while below the target's computed count, which rejected drafts pull back). Every
step the draft runs over what the target runs and it lacks (``mirror``), except the rows that
verify its own drafts: proposing already wrote the KV of the known token and every draft but the
last, and the accepted ones are exactly those tokens. Proposing then runs k passes: the first
over the request's tokens the draft has not seen (usually just the token the target sampled,
which it never ran), the others one draft token each. Positions past a request's blocks go to
scratch blocks kept after the shared ones and do not count as written. Drafts are the draft
model's argmax (a point-mass proposal, which the rejection sampler verifies exactly under any
sampling parameters); stale or missing draft KV could only lower acceptance, never change the
output.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from kvforge.config import ModelConfig
from kvforge.errors import InvalidRequestError
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.huge_pages import move_to_huge_pages
from kvforge.layers.kv_cache import PagedKVCache, block_bytes
from kvforge.loader import LoadedModel, load_model
from kvforge.utils import cdiv

logger = logging.getLogger(__name__)


class DraftModel:
    """The draft model, its mirrored KV cache and the proposal passes."""

    def __init__(
        self,
        model_config: ModelConfig,
        target_vocab_size: int,
        show_progress: bool = True,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.loaded = loaded or load_model(model_config, None, show_progress)
        self.model = self.loaded.model
        self.config = self.loaded.config
        if self.config.vocab_size != target_vocab_size:
            raise InvalidRequestError(
                f"the draft model's vocabulary has {self.config.vocab_size} tokens, the "
                f"target's {target_vocab_size}: a draft model must share the target's tokenizer",
                "speculative_model",
            )
        self.device = torch.device(model_config.device)
        self.huge_pages = model_config.huge_pages and self.device.type == "cpu"
        if self.huge_pages:
            move_to_huge_pages(self.model)
        self.kv_caches: list[PagedKVCache] = []
        self.first_scratch = 0

    def bytes_per_block(self, block_size: int) -> int:
        """The draft's KV bytes per block over all its layers."""
        cfg = self.config
        one = block_bytes("auto", self.loaded.kv_dtype, block_size, cfg.num_kv_heads, cfg.head_dim)
        return cfg.num_layers * one

    def allocate(self, num_blocks: int, block_size: int, scratch_blocks: int) -> None:
        """KV for the target's ``num_blocks`` blocks plus ``scratch_blocks`` for proposals."""
        cfg = self.config
        self.block_size = block_size
        self.first_scratch = num_blocks
        self.num_scratch = scratch_blocks
        self.kv_caches = [
            PagedKVCache.allocate(
                num_blocks + scratch_blocks,
                block_size,
                cfg.num_kv_heads,
                cfg.head_dim,
                self.loaded.kv_dtype,
                self.device,
                huge_pages=self.huge_pages,
            )
            for _ in range(cfg.num_layers)
        ]

    def mirror(self, batch: ForwardBatch) -> None:
        """Run a batch of the target's tokens through the draft, writing their KV. Image
        placeholders run as plain tokens: the draft has no vision tower (and its own width)."""
        if batch.mm_embeds is not None:
            batch = dataclasses.replace(batch, mm_embeds=None)
        self.model(batch, self.kv_caches)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """The target's copy-on-write copies, in the draft's cache."""
        for cache in self.kv_caches:
            cache.copy_blocks(src, dst)

    def propose(
        self,
        chunks: list[list[int]],
        starts: list[int],
        tables: list[list[int]],
        k: list[int],
    ) -> tuple[list[list[int]], list[int]]:
        """``k[i]`` greedy draft tokens for each request, after running ``chunks[i]`` (its
        tokens from position ``starts[i]`` through its last known token, whose KV the draft
        lacks); ``tables`` are their block tables. Also returns each request's positions with
        draft KV written in its own blocks (the chunk and every draft but the last)."""
        per_request = cdiv(max(k) + 1, self.block_size) + 1
        if per_request * len(k) > self.num_scratch:
            raise RuntimeError("not enough scratch blocks for the proposals")
        lasts = [start + len(chunk) - 1 for start, chunk in zip(starts, chunks)]
        full_tables = []
        for i, (table, last) in enumerate(zip(tables, lasts)):
            needed = cdiv(last + max(k) + 1, self.block_size)
            scratch = self.first_scratch + i * per_request
            extra = list(range(scratch, scratch + max(0, needed - len(table))))
            full_tables.append(table[:needed] + extra)
        written = [
            min(last + n, len(table) * self.block_size) for last, n, table in zip(lasts, k, tables)
        ]
        drafts: list[list[int]] = [[] for _ in k]
        active = list(range(len(k)))
        inputs, positions = list(chunks), list(starts)
        for _ in range(max(k)):
            active = [i for i in active if len(drafts[i]) < k[i]]
            if not active:
                break
            batch = ForwardBatch.build(
                [inputs[i] for i in active],
                [positions[i] for i in active],
                [full_tables[i] for i in active],
                self.block_size,
                self.device,
            )
            hidden = self.model(batch, self.kv_caches)
            if hidden.shape[0] > len(active):  # the first pass: each chunk's last token
                hidden = hidden[batch.query_start_loc + batch.query_lens - 1]
            best = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            for i, token in zip(active, best):
                drafts[i].append(token)
                positions[i] += len(inputs[i])
                inputs[i] = [token]
        return drafts, written
