"""Quantized matmul time per call: ATen methods vs the C++ ``quant_gemm`` with 16-bit (default)
and 8-bit activations and its float GEMM on dequantized tiles (``act_bits=0``, what it runs from
``QUANT_GEMM_DENSE_MIN_ROWS`` rows on the row layout), on the embedded model's shapes, in the
layout ``quant_gemm_repack`` picks here (row-interleaved on VNNI CPUs).

    python benchmarks/matmul.py [--rows 1 4 16 64 512] [--min-seconds 0.2] [--threads N]

Shapes are SmolLM2-135M's (the embedded model): the Q4_1 projections and the tied Q8_0 LM head.
Inputs are float32, as the model runs (the ATen kernels convert them to bfloat16); the LM head
returns float32 (``precise=True``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from kvforge.entrypoints.bench.report import cpu_model
from kvforge.layers.quantization import (
    BlockInt8Method,
    Int4PackedMethod,
    QuantGemmMethod,
)
from kvforge.ops.extension import load_extension
from kvforge.quant import QT, quantize, unpack_rows

# name, in_features, out_features, format
SHAPES = [
    ("qkv", 576, 960, "Q4_1"),
    ("o", 576, 576, "Q4_1"),
    ("gate_up", 576, 3072, "Q4_1"),
    ("down", 1536, 576, "Q4_1"),
    ("lm_head", 576, 49152, "Q8_0"),
]


def seconds_per_call(fn: Callable[[], object], min_seconds: float) -> float:
    """Median of timed calls after one warm-up, calling for at least ``min_seconds``."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def methods(cols: int, rows: int, name: str, ops: Any) -> list[Callable[[torch.Tensor], object]]:
    """The ATen method, then quant_gemm's kernels (16-, 8-bit activations, float GEMM on
    dequantized tiles) at any row count, on the same weights."""
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    qtype = QT.__members__[name]
    weights = unpack_rows(torch.from_numpy(quantize(values, qtype)), qtype, (rows, cols))
    aten = Int4PackedMethod(weights) if name == "Q4_1" else BlockInt8Method(weights)
    packed = QuantGemmMethod(weights, ops)
    kernels = [partial(_raw, ops, packed, bits) for bits in (16, 8, 0)]
    return [partial(aten, precise=True) if name == "Q8_0" else aten, *kernels]


def _raw(ops: Any, packed: QuantGemmMethod, act_bits: int, x: torch.Tensor) -> torch.Tensor:
    return ops.quant_gemm(x, packed.qs, packed.scales, packed.mins, act_bits)


def main() -> None:
    """Print one row per shape and number of input rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    parser.add_argument("--min-seconds", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_extension()
    if loaded.module is None:
        raise SystemExit(f"C++ ops extension unavailable: {loaded.error}")
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"quant_gemm SIMD path: {loaded.module.quant_gemm_isa()}")
    header = f"{'layer':<8} {'shape':<12} {'format':<6} {'M':>4}"
    columns = "".join(f" {name + ' ms':>9} {'speedup':>8}" for name in ("q16", "q8", "f32"))
    print(f"{header} {'aten ms':>9}{columns}")
    for layer, cols, rows, name in SHAPES:
        candidates = methods(cols, rows, name, loaded.module)
        for num_rows in args.rows:
            x = torch.randn(num_rows, cols)
            with torch.inference_mode():
                aten_s, *kernel_s = (
                    seconds_per_call(partial(method, x), args.min_seconds) for method in candidates
                )
            cells = "".join(f" {s * 1e3:>9.3f} {aten_s / s:>7.2f}x" for s in kernel_s)
            print(
                f"{layer:<8} {f'{cols}->{rows}':<12} {name:<6} {num_rows:>4} {aten_s * 1e3:>9.3f}{cells}"
            )


if __name__ == "__main__":
    main()
