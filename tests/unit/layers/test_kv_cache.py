"""One-byte KV cache: recent-block exact copies, deferred scale calibration, copies."""

from __future__ import annotations

import pytest
import torch

from kvforge.layers.kv_cache import PagedKVCache, RecentBlocks

BLOCK = 4
KVH, D = 2, 8


def _cache(
    kv_cache_dtype: str = "fp8_e4m3", capacity: int = 6, calculate: bool = False
) -> PagedKVCache:
    recent = RecentBlocks(capacity, 64, torch.device("cpu")) if capacity else None
    return PagedKVCache.allocate(
        64,
        BLOCK,
        KVH,
        D,
        torch.float32,
        torch.device("cpu"),
        kv_cache_dtype,
        calculate,
        None,
        recent,
    )


def _write(cache: PagedKVCache, table: list[int], start: int, x: torch.Tensor) -> None:
    """Write tokens x [T, KVH, D] (as both K and V) of one sequence from position start."""
    if cache.recent is not None:
        cache.recent.update([table], [start], [x.shape[0]], BLOCK)
    pos = torch.arange(start, start + x.shape[0])
    slots = torch.tensor(table)[pos // BLOCK] * BLOCK + pos % BLOCK
    cache.write(x, x, slots)


def _read(cache: PagedKVCache, table: list[int], length: int) -> torch.Tensor:
    pos = torch.arange(length)
    keys, _ = cache.gather(torch.tensor(table)[pos // BLOCK] * BLOCK + pos % BLOCK, torch.float32)
    return keys


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).float()


def test_recent_set_is_first_and_last_two_blocks_per_sequence():
    recent = RecentBlocks(capacity=8, num_blocks=16, device=torch.device("cpu"))
    recent.update([[3, 5, 7, 9, 11]], [0], [18], BLOCK)  # a prefill over all five blocks
    assert recent.promoted is not None
    assert sorted(recent.promoted[0].tolist()) == [3, 9, 11]
    assert (recent.slot_of_block >= 0).nonzero().flatten().tolist() == [3, 9, 11]
    recent.update([[3, 5, 7, 9, 11, 13]], [20], [1], BLOCK)  # decode moves into block 13
    assert recent.promoted is not None and recent.promoted[0].tolist() == [13]
    assert recent.slot_of_block[9] >= 0  # not wanted any more but nothing forced it out


def test_least_recently_used_block_outside_the_step_is_evicted():
    recent = RecentBlocks(capacity=3, num_blocks=16, device=torch.device("cpu"))
    recent.update([[1, 2]], [0], [8], BLOCK)  # blocks 1, 2
    recent.update([[4]], [0], [2], BLOCK)  # block 4: all three slots used
    recent.update([[1, 2]], [7], [1], BLOCK)  # refreshes blocks 1 and 2
    recent.update([[6]], [0], [1], BLOCK)  # needs a slot: 4 is the least recently used
    assert recent.slot_of_block[4] == -1
    assert all(recent.slot_of_block[b] >= 0 for b in (1, 2, 6))
    # When every slot is wanted by this step, a new block simply stays one-byte.
    recent.update([[1, 2], [6], [8]], [4, 0, 0], [1, 1, 1], BLOCK)
    assert recent.slot_of_block[8] == -1


def test_recent_blocks_read_back_exactly_and_old_ones_in_fp8():
    torch.manual_seed(0)
    cache = _cache(capacity=3)  # blocks leave only when a slot is needed
    table = [2, 7, 4, 9, 5]
    x = torch.randn(20, KVH, D)
    for t in range(20):  # decode one token at a time
        _write(cache, table, t, x[t : t + 1])
    out = _read(cache, table, 20)
    exact = [0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 18, 19]  # blocks 0, 3 and 4 of the table
    assert torch.equal(out[exact], x[exact])
    old = list(range(4, 12))
    assert torch.equal(out[old], _fp8(x[old]))
    assert not torch.equal(out[old], x[old])


def test_promoted_block_takes_its_earlier_tokens_from_one_byte_values():
    torch.manual_seed(0)
    cache = _cache(capacity=1)
    x = torch.randn(6, KVH, D)
    _write(cache, [3, 4], 0, x[:2])  # block 3 takes the only slot
    _write(cache, [8], 0, x[2:3])  # block 8 wants it: block 3 goes one-byte
    _write(cache, [3, 4], 2, x[3:4])  # block 3 is promoted again from its fp8 values
    out = _read(cache, [3, 4], 3)
    assert torch.equal(out[:2], _fp8(x[:2]))
    assert torch.equal(out[2], x[3])


def test_copy_on_write_gives_the_destination_the_source_exact_values():
    torch.manual_seed(0)
    cache = _cache()
    x = torch.randn(3, KVH, D)
    _write(cache, [1], 0, x)
    cache.recent.update([[6]], [3], [1], BLOCK)  # type: ignore[union-attr]  # fork into block 6
    cache.copy_blocks(torch.tensor([1]), torch.tensor([6]))
    extra = torch.randn(1, KVH, D)
    _write(cache, [6], 3, extra)
    out = _read(cache, [6], 4)
    assert torch.equal(out[:3], x)
    assert torch.equal(out[3], extra[0])


def test_scales_wait_for_enough_tokens_and_earlier_tokens_are_reencoded():
    torch.manual_seed(0)
    cache = _cache("int8", capacity=0, calculate=True)
    first = torch.randn(3, KVH, D) * 50 + 100  # a short, unusual first pass
    _write(cache, [0], 0, first)
    assert not cache.scales.is_set
    rest = torch.randn(140, KVH, D)
    table = list(range(1, 40))
    _write(cache, table, 0, rest[:60])
    _write(cache, table, 60, rest[60:])  # 203 tokens seen: the scales are set now
    assert cache.scales.is_set
    early = _read(cache, [0], 3)
    assert torch.allclose(early, first, rtol=0.02, atol=0.5)
    later = _read(cache, table, 140)
    assert torch.isfinite(later).all()
    assert (later - rest).abs().max() < 0.1


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_a_pathological_first_pass_gives_finite_values(kv_cache_dtype):
    cache = _cache(kv_cache_dtype, capacity=0, calculate=True)
    spike = torch.zeros(130, KVH, D)
    spike[:, :, 0] = 1.0  # every other channel is silent in the calibration tokens
    _write(cache, list(range(0, 33)), 0, spike)
    later = torch.randn(8, KVH, D) * 30
    _write(cache, [40, 41], 0, later)
    out = _read(cache, [40, 41], 8)
    assert torch.isfinite(out).all()
    assert (out - later).abs().max() < 0.2 * later.abs().max()
