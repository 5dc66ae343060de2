"""Radix-tree prefix cache over KV blocks (SGLang's RadixAttention at block granularity).

Each tree node is one full block: its key is the block's ``block_size`` token ids, its path
from the root is the token prefix whose KV the block continues. Roots are per namespace
``(lora_id, cache_salt)`` so adapters and salted requests never share KV.

NOTE: a request holding a node's block also holds every ancestor's block (KV of a prefix),
so a node's reference count is never above its parent's. Hence an unreferenced node has an
unreferenced subtree, and evicting a node together with its subtree is always safe. It holds
because a request only inserts under a node whose block it holds, and when it finds its
tokens already cached under another block it adopts that block and drops its duplicate
(SGLang does the same), instead of hanging its later blocks under a node it does not hold.
"""

from __future__ import annotations

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

        Returns the node now at that place. Its block differs from ``block_id`` when another
        request computed the same tokens first: the caller must then switch to the cached
        block (see ``KVCacheManager.cache_blocks``), so that the NOTE above stays true.
        """
        node = parent.children.get(key)
        if node is None:
            assert block_id not in self._nodes, f"block {block_id} is cached elsewhere"
            node = RadixNode(key, block_id, parent)
            parent.children[key] = node
            self._nodes[block_id] = node
        return node

    def node_of(self, block_id: int) -> RadixNode:
        """The tree node of a cached block."""
        return self._nodes[block_id]

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

    def _iter_nodes(self) -> list[RadixNode]:
        """Every node reachable from a root, parents before children."""
        nodes: list[RadixNode] = []
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def check_integrity(self) -> None:
        """Assert free + cached-unreferenced + in-use == total, each block in one state, and
        the tree invariants: every cached block reachable, evictable exactly when unreferenced,
        never referenced more than its parent (the NOTE in the module docstring)."""
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
        nodes = self._iter_nodes()
        assert len(nodes) == len(self._nodes), "a cached block is not reachable from a root"
        for node in nodes:
            block_id = node.block_id
            assert self._nodes.get(block_id) is node, f"block {block_id} cached twice"
            assert block_id not in free, f"cached block {block_id} is on the free list"
            count = pool.ref_cnt[block_id]
            assert (count == 0) == (block_id in evictable), f"block {block_id} evictable state"
            parent = node.parent
            assert parent is not None and parent.children.get(node.key) is node
            if parent.block_id >= 0:
                assert count <= pool.ref_cnt[parent.block_id], (
                    f"block {block_id} (count {count}) is referenced more than its parent "
                    f"{parent.block_id} (count {pool.ref_cnt[parent.block_id]})"
                )
