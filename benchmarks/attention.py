"""Attention micro-benchmark: torch_ref vs cpu_paged per call, on one layer's paged cache.

python benchmarks/attention.py [--dtype float32] [--kv-dtype bfloat16]
                               [--kv-cache-dtype fp8_e4m3] [--threads N]

Shapes are the embedded model's (H = 9 query heads, KVH = 3 KV heads, D = 64, blocks of 16);
its default run is float32 activations over a bfloat16 cache (``--kv-dtype bfloat16``).
Cases: decode batches (B = 1 and 16 at contexts 128 / 1024 / 4096), one 512-token prefill
chunk, and a mixed step (15 short decodes beside a 512-token chunk over 1024 cached tokens,
which torch_ref pads to the longest). A call is one layer's ``forward`` (K/V write +
attention); torch_ref's per-batch gather indices and mask are built once per batch and reused,
as across a model's layers. Times are the best of several rounds (others' load only adds).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from kvforge.entrypoints.bench.report import cpu_model
from kvforge.layers.attention import create_attention_backend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache

H, KVH, D, BLOCK = 9, 3, 64, 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    """One layer's step: a cache with each request's context and the batch of new tokens."""

    batch: ForwardBatch
    cache: PagedKVCache
    query: torch.Tensor  # [T, H, D]
    key: torch.Tensor  # [T, KVH, D]
    value: torch.Tensor


def make_case(
    contexts: list[int],
    query_lens: list[int],
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    kv_cache_dtype: str,
) -> Case:
    """Random context K/V written into scattered blocks, and random new tokens."""
    cpu = torch.device("cpu")
    needed = [-(-(c + q) // BLOCK) for c, q in zip(contexts, query_lens)]
    num_blocks = sum(needed) + 1
    order = (torch.randperm(num_blocks - 1) + 1).tolist()  # scattered, as after some churn
    tables = [order[sum(needed[:i]) : sum(needed[: i + 1])] for i in range(len(needed))]
    cache = PagedKVCache.allocate(num_blocks, BLOCK, KVH, D, kv_dtype, cpu, kv_cache_dtype)
    if sum(contexts):
        prefill = ForwardBatch.build(
            [[0] * c for c in contexts], [0] * len(contexts), tables, BLOCK, cpu
        )
        context_kv = [torch.randn(prefill.num_tokens, KVH, D, dtype=kv_dtype) for _ in range(2)]
        cache.write(*context_kv, prefill.slot_mapping)
    batch = ForwardBatch.build([[0] * q for q in query_lens], contexts, tables, BLOCK, cpu)
    num_tokens = batch.num_tokens
    return Case(
        batch,
        cache,
        torch.randn(num_tokens, H, D, dtype=dtype),
        torch.randn(num_tokens, KVH, D, dtype=dtype),
        torch.randn(num_tokens, KVH, D, dtype=dtype),
    )


def time_call(backend_name: str, case: Case, min_seconds: float) -> float:
    """Seconds per forward call: the best round (of at least 5) after a warm-up."""
    backend = create_attention_backend(backend_name)

    def call() -> None:
        backend.forward(
            case.query,
            case.key,
            case.value,
            case.cache,
            case.batch,
            scale=D**-0.5,
            sliding_window=None,
        )

    start = time.perf_counter()
    for _ in range(3):
        call()
    calls = max(1, int(0.02 / ((time.perf_counter() - start) / 3)))  # ~20 ms rounds
    best = float("inf")
    rounds = 0
    deadline = time.perf_counter() + min_seconds
    while rounds < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
        rounds += 1
    return best


CASES = [
    *(
        (f"decode B={b} ctx={ctx}", [ctx] * b, [1] * b)
        for b in (1, 16)
        for ctx in (128, 1024, 4096)
    ),
    ("prefill 512 (ctx 0)", [0], [512]),
    ("mixed: 15 decodes + 512", [128] * 15 + [1024], [1] * 15 + [512]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="activations")
    parser.add_argument("--kv-dtype", default=None, choices=sorted(DTYPES), help="16/32-bit KV")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto or a one-byte format")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timing per case")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    kv_dtype = DTYPES[args.kv_dtype or args.dtype]
    print(f"CPU: {cpu_model()}; torch threads: {torch.get_num_threads()}")
    print(
        f"H={H} KVH={KVH} D={D} block={BLOCK} activations={args.dtype} "
        f"kv={args.kv_dtype or args.dtype} kv_cache_dtype={args.kv_cache_dtype}"
    )
    print(f"{'case':<28}{'torch_ref ms':>14}{'cpu_paged ms':>14}{'speed-up':>10}")
    for label, contexts, query_lens in CASES:
        case = make_case(contexts, query_lens, dtype, kv_dtype, args.kv_cache_dtype)
        ref = time_call("torch_ref", case, args.min_seconds)
        paged = time_call("cpu_paged", case, args.min_seconds)
        print(f"{label:<28}{ref * 1e3:>14.3f}{paged * 1e3:>14.3f}{ref / paged:>9.1f}x")


if __name__ == "__main__":
    main()
