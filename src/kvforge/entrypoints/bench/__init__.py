"""``kvforge bench``: llama-bench style latency, offline throughput, and a streaming load
generator for any OpenAI-compatible server."""

from kvforge.entrypoints.bench.cli import add_bench_parser
from kvforge.entrypoints.bench.report import LatencyStats

__all__ = ["LatencyStats", "add_bench_parser"]
