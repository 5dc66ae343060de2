"""BlockPool: fixed-size KV blocks by integer id with reference counts. Integers only."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Owns every KV block id and its reference count.

    A block is *free* (in ``free_block_ids``, reference count 0, holds nothing useful),
    *in use* (reference count > 0), or *cached* (reference count 0 but kept by the prefix cache,
    which can evict it back to free). The pool knows free and in use; the prefix cache knows
    cached.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.num_in_use = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list (excludes evictable cached blocks)."""
        return len(self.free_block_ids)

    def allocate(self) -> int:
        """Take a free block and give it reference count 1."""
        block_id = self.free_block_ids.popleft()
        assert self.ref_cnt[block_id] == 0
        self.ref_cnt[block_id] = 1
        self.num_in_use += 1
        return block_id

    def incref(self, block_id: int) -> None:
        """Add a reference; a block at 0 (cached) becomes in use."""
        if self.ref_cnt[block_id] == 0:
            self.num_in_use += 1
        self.ref_cnt[block_id] += 1

    def decref(self, block_id: int) -> bool:
        """Drop a reference; return True when the block's count reached 0."""
        assert self.ref_cnt[block_id] > 0, f"block {block_id} freed twice"
        self.ref_cnt[block_id] -= 1
        if self.ref_cnt[block_id] == 0:
            self.num_in_use -= 1
            return True
        return False

    def release(self, block_id: int) -> None:
        """Return an unreferenced block to the free list."""
        assert self.ref_cnt[block_id] == 0
        self.free_block_ids.append(block_id)
