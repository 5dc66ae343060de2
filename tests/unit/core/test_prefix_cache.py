"""Radix prefix cache over a block pool."""

from __future__ import annotations

import pytest

from kvforge.core import BlockPool, RadixPrefixCache


def test_match_insert_evict_cycle():
    pool = BlockPool(4)
    cache = RadixPrefixCache(pool, block_size=2)
    ns = (0, None)
    a, b = pool.allocate(), pool.allocate()
    node = cache.insert(cache.root(ns), (1, 2), a)
    cache.insert(node, (3, 4), b)
    assert [n.block_id for n in cache.match(ns, [1, 2, 3, 4, 5])] == [a, b]
    assert [n.block_id for n in cache.match(ns, [1, 2, 9, 9])] == [a]
    assert cache.match((1, None), [1, 2]) == []  # another namespace (LoRA id) sees nothing
    for block in (b, a):  # release tail first
        assert pool.decref(block)
        assert cache.release(block)
    cache.check_integrity()
    assert cache.num_evictable_blocks == 2
    cache.evict(1)  # evicts the least recently used leaf
    assert [n.block_id for n in cache.match(ns, [1, 2, 3, 4])] == [a]
    cache.check_integrity()
    cache.reset()
    assert pool.num_free_blocks == 4


def test_integrity_check_detects_a_leak():
    pool = BlockPool(3)
    cache = RadixPrefixCache(pool, block_size=2)
    pool.allocate()
    pool.free_block_ids.append(0)  # corrupt: block 0 is both free and in use
    with pytest.raises(AssertionError):
        cache.check_integrity()


def test_integrity_check_detects_a_referenced_block_under_an_unreferenced_one():
    # What the old insert produced: a request's block cached under another request's node.
    pool = BlockPool(4)
    cache = RadixPrefixCache(pool, block_size=2)
    parent_block, child_block = pool.allocate(), pool.allocate()
    node = cache.insert(cache.root((0, None)), (1, 2), parent_block)
    cache.insert(node, (3, 4), child_block)
    cache.check_integrity()
    assert pool.decref(parent_block) and cache.release(parent_block)  # its owner finished
    with pytest.raises(AssertionError, match="referenced more than its parent"):
        cache.check_integrity()
    with pytest.raises(AssertionError, match="evicting a referenced block"):
        cache.evict(1)


def test_insert_keeps_the_cached_node_for_the_caller_to_adopt():
    pool = BlockPool(4)
    cache = RadixPrefixCache(pool, block_size=2)
    root = cache.root((0, None))
    first, duplicate = pool.allocate(), pool.allocate()
    assert cache.insert(root, (1, 2), first).block_id == first
    assert cache.insert(root, (1, 2), duplicate).block_id == first
    assert not cache.is_cached(duplicate)
