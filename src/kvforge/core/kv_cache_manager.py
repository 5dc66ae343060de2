"""KVCacheManager: the scheduler's only KV API (blocks, prefix cache, copy-on-write)."""

from __future__ import annotations

from collections.abc import Iterable

from kvforge.core.block_pool import BlockPool
from kvforge.core.prefix_cache import RadixNode, RadixPrefixCache
from kvforge.request import Request
from kvforge.utils import cdiv


class KVCacheManager:
    """Allocates blocks to requests, shares cached prefixes and copies shared blocks on write.

    ``request.block_ids[i]`` holds the KV of the request's tokens ``[i * block_size,
    (i + 1) * block_size)``. Blocks shared by several requests (a forked prompt, a beam's
    history) are copied before one of them writes into it; the copies to run are queued in
    ``take_copies()`` for the model runner.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.prefix_cache = RadixPrefixCache(self.pool, block_size)
        # request id -> (deepest tree node of its cached blocks, number of its blocks cached)
        self._cache_state: dict[str, tuple[RadixNode, int]] = {}
        self._copies: list[tuple[int, int]] = []

    @property
    def num_blocks(self) -> int:
        """Total blocks in the cache."""
        return self.pool.num_blocks

    @property
    def num_available_blocks(self) -> int:
        """Blocks that an allocation can obtain: free plus evictable cached."""
        return self.pool.num_free_blocks + self.prefix_cache.num_evictable_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests."""
        return self.pool.num_in_use / self.pool.num_blocks

    def _namespace(self, request: Request) -> tuple[int, str | None]:
        return (request.lora_id, request.cache_salt)

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Cached blocks holding a prefix of the request's tokens (not yet referenced).

        At least one token is always left to compute, so the model produces logits.
        Requests asking for prompt logprobs skip the cache: they need every position's logits.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        token_ids = request.cache_key_ids
        usable = (len(token_ids) - 1) // self.block_size * self.block_size
        nodes = self.prefix_cache.match(self._namespace(request), token_ids[:usable])
        return [node.block_id for node in nodes]

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens; False (nothing changed) if full.

        ``computed_blocks`` (from :meth:`get_computed_blocks`) are referenced first.
        """
        computed_blocks = computed_blocks or []
        size = self.block_size
        start = request.num_computed_tokens + len(computed_blocks) * size
        num_existing = len(request.block_ids) + len(computed_blocks)
        num_needed = max(0, cdiv(start + num_new_tokens, size) - num_existing)
        write_index = start // size
        needs_copy = (
            write_index < len(request.block_ids)
            and self.pool.ref_cnt[request.block_ids[write_index]] > 1
        )
        evictable_reused = sum(1 for b in computed_blocks if self.pool.ref_cnt[b] == 0)
        if num_needed + needs_copy > self.num_available_blocks - evictable_reused:
            return False
        if computed_blocks:
            # NOTE: computed blocks come first, so the request holds the whole matched path:
            # its cache state may point at the deepest one (see the prefix cache's NOTE).
            assert not request.block_ids, "computed blocks are for a request without blocks"
            for block_id in computed_blocks:
                self.pool.incref(block_id)
                self.prefix_cache.acquire(block_id)
            request.block_ids.extend(computed_blocks)
            node = self.prefix_cache.node_of(computed_blocks[-1])
            self._cache_state[request.request_id] = (node, len(computed_blocks))
        if needs_copy:
            # Copy-on-write: the shared block keeps its other owners; we write into a copy.
            shared = request.block_ids[write_index]
            private = self._allocate_block()
            self._copies.append((shared, private))
            self._decref(shared)
            request.block_ids[write_index] = private
            request.replaced_blocks.append(write_index)
        request.block_ids.extend(self._allocate_block() for _ in range(num_needed))
        return True

    def _allocate_block(self) -> int:
        if self.pool.num_free_blocks == 0:
            self.prefix_cache.evict(1)
        return self.pool.allocate()

    def _decref(self, block_id: int) -> None:
        if self.pool.decref(block_id) and not self.prefix_cache.release(block_id):
            self.pool.release(block_id)

    def cache_blocks(self, request: Request) -> None:
        """Insert the request's newly completed full blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        node, num_cached = self._cache_state.get(
            request.request_id, (self.prefix_cache.root(self._namespace(request)), 0)
        )
        if num_cached >= num_full:
            return
        token_ids = request.cache_key_ids
        size = self.block_size
        for index in range(num_cached, num_full):
            key = tuple(token_ids[index * size : (index + 1) * size])
            block_id = request.block_ids[index]
            node = self.prefix_cache.insert(node, key, block_id)
            if node.block_id != block_id:
                # Another request cached these tokens first. Adopt its block and drop ours
                # (identical KV of identical tokens), so the request holds every block on its
                # tree path and later blocks go under a node it holds (the prefix cache's NOTE).
                # Safe for the runner: the block is full and computed, so only read from now on.
                assert not self.prefix_cache.is_cached(block_id)
                self.pool.incref(node.block_id)
                self.prefix_cache.acquire(node.block_id)
                self._decref(block_id)
                request.block_ids[index] = node.block_id
                request.replaced_blocks.append(index)
        self._cache_state[request.request_id] = (node, num_full)

    def trim(self, request: Request) -> None:
        """Free the blocks past the request's computed tokens (KV of rejected draft tokens).

        They were allocated for this step's drafts, so they are private and uncached.
        """
        keep = cdiv(request.num_computed_tokens, self.block_size)
        while len(request.block_ids) > keep:
            self._decref(request.block_ids.pop())
        request.num_blocks_sent = min(request.num_blocks_sent, keep)
        request.replaced_blocks = [i for i in request.replaced_blocks if i < keep]

    def fork(self, parent: Request, child: Request) -> None:
        """Give ``child`` shared references to the parent's computed blocks (copy-on-write)."""
        assert not child.block_ids
        num_blocks = cdiv(parent.num_computed_tokens, self.block_size)
        assert len(parent.block_ids) >= num_blocks
        child.block_ids = parent.block_ids[:num_blocks]
        for block_id in child.block_ids:
            self.pool.incref(block_id)
        state = self._cache_state.get(parent.request_id)
        if state is not None:
            self._cache_state[child.request_id] = state

    def free(self, request: Request) -> None:
        """Drop the request's references; cached blocks stay reusable until evicted."""
        # Tail first, so a request's deeper blocks are least recently used and evicted first.
        for block_id in reversed(request.block_ids):
            self._decref(block_id)
        request.block_ids = []
        self._cache_state.pop(request.request_id, None)

    def take_copies(self) -> list[tuple[int, int]]:
        """Block copies (source, destination) queued by copy-on-write since the last call."""
        copies, self._copies = self._copies, []
        return copies

    def reset_prefix_cache(self) -> None:
        """Evict every unreferenced cached block."""
        self.prefix_cache.reset()

    def check_integrity(self, requests: Iterable[Request] | None = None) -> None:
        """Assert that every block is exactly one of free, cached, in use.

        With ``requests`` (every request holding blocks), also assert that each block's
        reference count is the number of requests holding it, and that each request's cached
        blocks are the tree path from its namespace's root.
        """
        self.prefix_cache.check_integrity()
        if requests is None:
            return
        holders = [0] * self.pool.num_blocks
        request_ids = set()
        for request in requests:
            request_ids.add(request.request_id)
            assert len(set(request.block_ids)) == len(request.block_ids), (
                f"{request.request_id} holds a block twice"
            )
            for block_id in request.block_ids:
                holders[block_id] += 1
            self._check_cache_state(request)
        for block_id, (count, expected) in enumerate(zip(self.pool.ref_cnt, holders)):
            assert count == expected, f"block {block_id}: count {count}, {expected} holders"
        assert set(self._cache_state) <= request_ids, "cache state of a gone request"

    def _check_cache_state(self, request: Request) -> None:
        state = self._cache_state.get(request.request_id)
        if state is None:
            return
        node, num_cached = state
        assert num_cached <= len(request.block_ids)
        for index in reversed(range(num_cached)):
            assert node.block_id == request.block_ids[index], (
                f"{request.request_id}: block {index} is {request.block_ids[index]}, its "
                f"tree node holds {node.block_id}"
            )
            assert node.parent is not None
            node = node.parent
        assert node is self.prefix_cache.root(self._namespace(request)), "path not from root"
