"""Radix-tree prefix cache over KV blocks (SGLang's RadixAttention at block granularity).

Each tree node is one full block: its key is the block's ``block_size`` token ids, its path
from the root is the token prefix whose KV the block continues. Roots are per namespace
``(lora_id, cache_salt)`` so adapters and salted requests never share KV.

NOTE: a request holding a node's block also holds every ancestor's block (KV of a prefix),
so a node's reference count is never above its parent's. Hence an unreferenced node has an
unreferenced subtree, and evicting a node together with its subtree is always safe.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from kvforge.core.block_pool import BlockPool

Namespace = tuple[int, str | None]


class RadixNode:
    """One cached block in the tree."""

    __slots__ = ("key", "block_id", "parent", "children")

    def __init__(self, key: tuple[int, ...], block_id: int, parent: RadixNode | None) -> None:
        self.key = key
        self.block_id = block_id
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}


class RadixPrefixCache:
    """Maps token prefixes to cached block ids; tracks which cached blocks can be evicted."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._roots: dict[Namespace, RadixNode] = {}
        self._nodes: dict[int, RadixNode] = {}  # block id -> node
        # Cached blocks with reference count 0, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_queries = 0  # tokens looked up
        self.num_hits = 0  # tokens found

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks nobody references (reusable after eviction)."""
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks held by the tree, referenced or not."""
        return len(self._nodes)

    def root(self, namespace: Namespace) -> RadixNode:
        """The (created on demand) root node of a namespace."""
        node = self._roots.get(namespace)
        if node is None:
            node = self._roots[namespace] = RadixNode((), -1, None)
        return node

    def is_cached(self, block_id: int) -> bool:
        """Whether the block is a tree node."""
        return block_id in self._nodes

    def match(self, namespace: Namespace, token_ids: list[int]) -> list[RadixNode]:
        """Longest chain of cached full blocks that prefixes ``token_ids``."""
        size = self.block_size
        node = self._roots.get(namespace)
        path: list[RadixNode] = []
        for start in range(0, len(token_ids) - size + 1, size):
            if node is None:
                break
            node = node.children.get(tuple(token_ids[start : start + size]))
            if node is not None:
                path.append(node)
        self.num_queries += len(token_ids)
        self.num_hits += len(path) * size
        return path

    def insert(self, parent: RadixNode, key: tuple[int, ...], block_id: int) -> RadixNode:
        """Add ``block_id`` as ``parent``'s child for ``key``; keep an existing node instead.

        Returns the node now at that place; its block may differ from ``block_id`` when
        another request computed the same tokens first (then ``block_id`` stays uncached).
        """
        node = parent.children.get(key)
        if node is None and block_id not in self._nodes:
            node = RadixNode(key, block_id, parent)
            parent.children[key] = node
            self._nodes[block_id] = node
        return node if node is not None else self._nodes[block_id]

    def acquire(self, block_id: int) -> None:
        """A cached block gets a reference: it is no longer evictable."""
        self._evictable.pop(block_id, None)

    def release(self, block_id: int) -> bool:
        """A block's count reached 0: keep it evictable if cached; False if not cached."""
        if block_id not in self._nodes:
            return False
        self._evictable[block_id] = None
        self._evictable.move_to_end(block_id)
        return True

    def evict(self, num_blocks: int) -> None:
        """Move at least ``num_blocks`` least-recently-used cached blocks to the free list."""
        freed = 0
        while freed < num_blocks and self._evictable:
            block_id = next(iter(self._evictable))
            freed += self._remove_subtree(self._nodes[block_id])

    def _remove_subtree(self, node: RadixNode) -> int:
        assert node.parent is not None
        del node.parent.children[node.key]
        removed = 0
        stack = [node]
        while stack:
            current = stack.pop()
            stack.extend(current.children.values())
            assert self.pool.ref_cnt[current.block_id] == 0, "evicting a referenced block"
            del self._nodes[current.block_id]
            del self._evictable[current.block_id]
            self.pool.release(current.block_id)
            removed += 1
        return removed

    def reset(self) -> None:
        """Evict every unreferenced cached block."""
        self.evict(len(self._evictable))

    def check_integrity(self) -> None:
        """Assert free + cached-unreferenced + in-use == total, each block in one state."""
        pool = self.pool
        free = set(pool.free_block_ids)
        assert len(free) == len(pool.free_block_ids), "block on the free list twice"
        evictable = set(self._evictable)
        in_use = {b for b, count in enumerate(pool.ref_cnt) if count > 0}
        assert not (free & evictable) and not (free & in_use) and not (evictable & in_use)
        assert len(free) + len(evictable) + len(in_use) == pool.num_blocks, (
            f"free {len(free)} + cached {len(evictable)} + in use {len(in_use)} "
            f"!= total {pool.num_blocks}"
        )
        assert len(in_use) == pool.num_in_use
        for block_id in evictable:
            assert block_id in self._nodes
        for node in itertools.chain.from_iterable(
            r.children.values() for r in self._roots.values()
        ):
            assert node.parent is not None
