"""Draft-model proposer: a small model sharing the target's vocabulary proposes k tokens.

Its KV cache mirrors the target's block for block: it has the same number of blocks, and every
step the draft model runs over exactly the tokens the target runs, writing its KV at the same
slots. Block tables, allocation, copy-on-write, prefix caching, preemption and the rollback of
rejected drafts therefore hold for the draft's KV with no bookkeeping of its own: a block's
draft KV is valid exactly where the target's is.

Proposing then runs the draft k times, one token per proposing request per pass, from the
token the target just sampled. Those passes write draft KV at positions past the request's
computed tokens: inside its own blocks that is space the next step's mirror pass overwrites
before anything reads it, and past its last block it goes to scratch blocks kept after the
shared ones. Drafts are the draft model's argmax (a point-mass proposal, which the rejection
sampler verifies exactly under any sampling parameters).
"""

from __future__ import annotations

import logging

import torch

from kvforge.config import ModelConfig
from kvforge.errors import InvalidRequestError
from kvforge.layers.forward_batch import ForwardBatch
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
            )
            for _ in range(cfg.num_layers)
        ]

    def mirror(self, batch: ForwardBatch) -> None:
        """Run the target's batch through the draft so its KV follows the target's."""
        self.model(batch, self.kv_caches)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """The target's copy-on-write copies, in the draft's cache."""
        for cache in self.kv_caches:
            cache.copy_blocks(src, dst)

    def propose(
        self, last_tokens: list[int], positions: list[int], tables: list[list[int]], k: list[int]
    ) -> list[list[int]]:
        """``k[i]`` greedy draft tokens after ``last_tokens[i]`` at ``positions[i]`` (whose
        KV is not computed yet) for each request; ``tables`` are their block tables."""
        per_request = cdiv(max(k) + 1, self.block_size) + 1
        if per_request * len(k) > self.num_scratch:
            raise RuntimeError("not enough scratch blocks for the proposals")
        full_tables = []
        for i, (table, position) in enumerate(zip(tables, positions)):
            needed = cdiv(position + max(k) + 1, self.block_size)
            scratch = self.first_scratch + i * per_request
            extra = list(range(scratch, scratch + max(0, needed - len(table))))
            full_tables.append(table[:needed] + extra)
        drafts: list[list[int]] = [[] for _ in k]
        tokens = list(last_tokens)
        active = list(range(len(k)))
        for step in range(max(k)):
            active = [i for i in active if len(drafts[i]) < k[i]]
            if not active:
                break
            batch = ForwardBatch.build(
                [[tokens[i]] for i in active],
                [positions[i] + step for i in active],
                [full_tables[i] for i in active],
                self.block_size,
                self.device,
            )
            hidden = self.model(batch, self.kv_caches)
            best = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            for i, token in zip(active, best):
                drafts[i].append(token)
                tokens[i] = token
        return drafts
