"""cpu_paged attention (C++ kernel over the paged cache) against the torch_ref backend.

Each case writes the same context into separate caches, then runs one step of new tokens
through cpu_paged on one and torch_ref on the others. Tolerances: float32 within 1e-5;
bfloat16 within one bf16 rounding (relative 2^-8) of torch_ref in float32 on the same bf16
values (the kernel accumulates in float32 and rounds once), and within 3e-2 + 1% of torch_ref
run in bfloat16 (which also rounds dequantized values and its softmax to bf16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch

from kvforge.layers.attention.base import _auto_backend, resolve_attention_backend
from kvforge.layers.attention.torch_ref import TorchRefAttentionBackend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache, RecentBlocks
from kvforge.ops import extension

CPU = torch.device("cpu")
F32_TOL = 1e-5
BF16_ROUNDING = 2.0**-8  # half a bf16 ulp, relative to the value, at most
BF16_VS_REF = (3e-2, 1e-2)  # (atol, rtol)


@pytest.fixture(scope="module")
def backend():
    """The cpu_paged backend; the module's kernel tests skip when the extension cannot build."""
    loaded = extension.load_extension()
    if loaded.module is None:
        pytest.skip(f"paged attention extension unavailable: {loaded.error}")
    from kvforge.layers.attention.cpu_paged import CpuPagedAttentionBackend

    return CpuPagedAttentionBackend()


@dataclass
class Case:
    """One attention step: per-request context and new-token counts and the cache layout."""

    contexts: list[int]
    query_lens: list[int]
    block_size: int = 16
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    sliding_window: int | None = None
    kv_cache_dtype: str = "auto"
    recent_capacity: int = 0
    calculate_scales: bool = False
    extra_blocks: int = 0  # allocated but unused blocks at the end of request 0's table
    poison: bool = False  # fill every block cpu_paged must not read with NaN
    query_dtype: torch.dtype | None = None  # default: the cache dtype


def _tables(case: Case, generator: torch.Generator) -> tuple[list[list[int]], int]:
    """Scattered block tables (block 0 is never used) and the number of blocks."""
    needed = [
        -(-(c + q) // case.block_size) + (case.extra_blocks if i == 0 else 0)
        for i, (c, q) in enumerate(zip(case.contexts, case.query_lens))
    ]
    num_blocks = sum(needed) + 3
    order = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables, start = [], 0
    for n in needed:
        tables.append(order[start : start + n])
        start += n
    return tables, num_blocks


def _cache(case: Case, num_blocks: int) -> PagedKVCache:
    recent = RecentBlocks(case.recent_capacity, num_blocks, CPU) if case.recent_capacity else None
    return PagedKVCache.allocate(
        num_blocks,
        case.block_size,
        case.num_kv_heads,
        case.head_dim,
        case.dtype,
        CPU,
        case.kv_cache_dtype,
        case.calculate_scales,
        None,
        recent,
    )


def _poison_unused(cache: PagedKVCache, tables: list[list[int]], case: Case) -> None:
    """NaN in every cache slot outside the requests' contexts (incl. block 0, table padding)."""
    flat_k, flat_v = cache.k.view(-1, *cache.k.shape[2:]), cache.v.view(-1, *cache.v.shape[2:])
    used = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    for table, context, query_len in zip(tables, case.contexts, case.query_lens):
        pos = torch.arange(context + query_len)
        used[
            torch.tensor(table)[pos // case.block_size] * case.block_size + pos % case.block_size
        ] = True
    flat_k[~used] = float("nan")
    flat_v[~used] = float("nan")


def run_case(case: Case, backend, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cpu_paged output, torch_ref output, torch_ref output on float32 copies of the inputs)."""
    generator = torch.Generator().manual_seed(seed)
    tables, num_blocks = _tables(case, generator)
    kv_heads, dim = case.num_kv_heads, case.head_dim

    def randn(*shape: int, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 1.5 + shift).to(case.dtype)

    num_context = sum(case.contexts)
    context_k, context_v = (
        randn(num_context, kv_heads, dim, shift=0.5),
        randn(num_context, kv_heads, dim),
    )
    num_new = sum(case.query_lens)
    query_dtype = case.query_dtype or case.dtype
    query = randn(num_new, case.num_heads, dim).to(query_dtype)
    key, value = randn(num_new, kv_heads, dim, shift=0.5), randn(num_new, kv_heads, dim)
    starts = [0] * len(case.contexts)
    prefill = ForwardBatch.build(
        [[0] * c for c in case.contexts], starts, tables, case.block_size, CPU
    )
    step = ForwardBatch.build(
        [[0] * q for q in case.query_lens], case.contexts, tables, case.block_size, CPU
    )
    outputs = []
    for name in ("cpu_paged", "torch_ref", "torch_ref_f32"):
        cache = _cache(case, num_blocks)
        if cache.recent is not None:
            cache.recent.update(tables, starts, case.contexts, case.block_size)
        if num_context:
            cache.write(context_k, context_v, prefill.slot_mapping)
        if name == "cpu_paged" and case.poison:
            _poison_unused(cache, tables, case)
        if cache.recent is not None:
            cache.recent.update(tables, case.contexts, case.query_lens, case.block_size)
        attention = backend if name == "cpu_paged" else TorchRefAttentionBackend()
        as_f32 = name == "torch_ref_f32"
        inputs = [x.float() if as_f32 else x for x in (query, key, value)]
        outputs.append(
            attention.forward(
                *inputs,
                cache,
                step,
                scale=dim**-0.5,
                sliding_window=case.sliding_window,
            )
        )
    return outputs[0], outputs[1], outputs[2]


def check(case: Case, backend, seed: int = 0) -> None:
    """cpu_paged matches torch_ref within the dtype's tolerance (see the module docstring)."""
    out, ref, ref_f32 = run_case(case, backend, seed)
    assert out.shape == ref.shape == (sum(case.query_lens), case.num_heads, case.head_dim)
    assert out.dtype == (case.query_dtype or case.dtype)
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=F32_TOL, rtol=F32_TOL)
    else:
        torch.testing.assert_close(out.float(), ref_f32, atol=1e-5, rtol=BF16_ROUNDING)
        atol, rtol = BF16_VS_REF
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# Mixed steps: decodes, a fresh prefill, chunked prefills over cached context.
MIXED = ([37, 0, 5, 100, 64], [1, 23, 1, 40, 17])


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_mixed_batch_matches_torch_ref(backend, block_size, heads, dtype):
    contexts, query_lens = MIXED
    check(Case(contexts, query_lens, block_size, *heads, dtype=dtype), backend)


@pytest.mark.parametrize("window", [1, 8, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_sliding_window(backend, window, dtype):
    contexts, query_lens = MIXED
    check(Case(contexts, query_lens, block_size=4, dtype=dtype, sliding_window=window), backend)


@pytest.mark.parametrize(
    ("contexts", "query_lens", "window"),
    [
        ([3000], [1], None),  # one long decode: split-K over the context
        ([3000, 2999], [1, 1], 1000),  # split-K with a window
        ([2900], [5], None),  # a short prefill chunk over a long context: split-K rows
        ([2900], [5], 700),
        ([2900], [70], 100),  # enough query tiles: no split
    ],
)
def test_long_context_split_k(backend, contexts, query_lens, window):
    check(Case(contexts, query_lens, sliding_window=window), backend)
    check(Case(contexts, query_lens, sliding_window=window, dtype=torch.bfloat16), backend)


def test_never_reads_outside_the_context(backend):
    """Unused table entries (extra blocks, zero padding) and other blocks hold NaN."""
    check(Case([9, 130, 3], [1, 1, 12], block_size=4, extra_blocks=3, poison=True), backend)
    check(Case([3000], [1], extra_blocks=5, poison=True), backend)


def test_query_and_cache_dtypes_may_differ(backend):
    contexts, query_lens = MIXED
    # float32 activations over a bfloat16 cache: the default for packed (GGUF) weights
    check(Case(contexts, query_lens, dtype=torch.bfloat16, query_dtype=torch.float32), backend)
    check(Case(contexts, query_lens, query_dtype=torch.bfloat16), backend)


@pytest.mark.parametrize("head_dim", [32, 40, 128])
def test_other_head_dims(backend, head_dim):
    contexts, query_lens = MIXED
    check(Case(contexts, query_lens, num_heads=8, num_kv_heads=2, head_dim=head_dim), backend)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("recent_capacity", [0, 6], ids=["one-byte", "recent"])
@pytest.mark.parametrize("calculate_scales", [False, True], ids=["unit", "calculated"])
def test_one_byte_caches(backend, kv_cache_dtype, recent_capacity, calculate_scales):
    """Scales, means, int8 token scales and recent exact copies folded into the kernel; the
    150-token context calibrates the scales when they are calculated."""
    contexts, query_lens = [150, 0, 40, 100], [1, 7, 1, 30]
    for dtype in (torch.float32, torch.bfloat16):
        case = Case(
            contexts,
            query_lens,
            block_size=4,
            dtype=dtype,
            kv_cache_dtype=kv_cache_dtype,
            recent_capacity=recent_capacity,
            calculate_scales=calculate_scales,
        )
        check(case, backend)


def test_one_byte_cache_split_k(backend):
    check(Case([3000], [1], kv_cache_dtype="int8", recent_capacity=4), backend)


@pytest.mark.parametrize("num_threads", [1, 3])
def test_thread_counts(backend, num_threads):
    """Work items and split-K chunks are planned for the thread count; results do not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        check(Case([3000, 40, 7], [1, 1, 30]), backend)
    finally:
        torch.set_num_threads(before)


def test_rejects_a_block_outside_the_cache(backend):
    cache = PagedKVCache.allocate(4, 4, 1, 8, torch.float32, CPU)
    lengths = torch.tensor([5])
    with pytest.raises(RuntimeError, match="out of range"):
        backend._ops.paged_attention(
            torch.zeros(1, 1, 8),
            cache.k,
            cache.v,
            torch.tensor([[1, 4]]),  # block 4 of 4
            lengths,
            torch.tensor([1]),
            torch.tensor([0]),
            1.0,
            0,
        )


def test_writes_new_tokens_like_torch_ref(backend):
    case = Case([5, 0], [1, 6], block_size=4)
    generator = torch.Generator().manual_seed(0)
    tables, num_blocks = _tables(case, generator)
    batch = ForwardBatch.build([[0], [0] * 6], case.contexts, tables, case.block_size, CPU)
    query = torch.randn(7, 9, 64, generator=generator)
    key, value = torch.randn(2, 7, 3, 64, generator=generator)
    caches = [_cache(case, num_blocks) for _ in range(2)]
    for attention, cache in zip((backend, TorchRefAttentionBackend()), caches):
        attention.forward(query, key, value, cache, batch, scale=0.125, sliding_window=None)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert torch.equal(caches[0].k.view(-1, 3, 64)[batch.slot_mapping], key)


def test_auto_resolves_to_cpu_paged_on_cpu(backend):
    assert resolve_attention_backend("auto", CPU) == "cpu_paged"
    assert resolve_attention_backend("torch_ref", CPU) == "torch_ref"
    assert resolve_attention_backend("auto", torch.device("meta")) == "torch_ref"


def test_auto_falls_back_with_the_reason(monkeypatch, caplog):
    failed = extension.ExtensionLoad(None, "RuntimeError: no compiler", None)
    monkeypatch.setattr(extension, "load_extension", lambda: failed)
    with caplog.at_level(logging.INFO, logger="kvforge.layers.attention.base"):
        assert _auto_backend.__wrapped__("cpu") == "torch_ref"
    assert "torch_ref" in caplog.text and "no compiler" in caplog.text


def test_loader_returns_none_without_a_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    result = extension.load_extension.__wrapped__()
    assert result.module is None and result.build_dir is None
    assert result.error is not None and "/nonexistent/c++" in result.error
