"""One-stream decode speed with each of the last decode levers off, in one process.

    python benchmarks/decode_levers.py [--max-tokens 128] [--rounds 8]

Engines over the embedded model, measured in turns (greedy, ``ignore_eos``; medians of
``--rounds``), so the machine's drift hits all alike:
- ``default``: weights and KV caches in huge pages, ``decoder_stack``'s one parallel region for
  up to 16 tokens;
- ``no team``: the same engine with the model's fused stack switched off, so each layer runs as
  ``decoder_layer`` (one parallel region per op);
- ``no huge pages``: ``huge_pages=False`` (the team path on);
- ``neither``.
Greedy sampling takes the one-pass ``greedy_sample`` in all four.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from kvforge import LLM, SamplingParams
from kvforge.entrypoints.bench.report import cpu_model


def _rate(llm: LLM, team: bool, params: SamplingParams) -> float:
    model: Any = llm.engine.runner.model
    saved = (model._stack, model._stack_checked)
    if not team:
        model._stack, model._stack_checked = None, True
    try:
        start = time.perf_counter()
        out = llm.generate(["Tell me a story about a cat."], params, use_tqdm=False)
        return len(out[0].outputs[0].token_ids) / (time.perf_counter() - start)
    finally:
        model._stack, model._stack_checked = saved


def main() -> None:
    """Print generated tokens/s per configuration and the ratios to ``neither``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    huge = LLM(max_model_len=1024, max_num_seqs=4)
    plain = LLM(max_model_len=1024, max_num_seqs=4, huge_pages=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    configs = {
        "default": (huge, True),
        "no team": (huge, False),
        "no huge pages": (plain, True),
        "neither": (plain, False),
    }
    for llm, team in configs.values():
        _rate(llm, team, params)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (llm, team) in configs.items():
            rates[name].append(_rate(llm, team, params))
    base = statistics.median(rates["neither"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"{name:<14} {median:7.1f} tok/s (min {min(values):6.1f}, max {max(values):6.1f})"
            f"  {median / base:5.2f}x"
        )


if __name__ == "__main__":
    main()
