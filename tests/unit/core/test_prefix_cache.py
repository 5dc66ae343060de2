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
