"""Single-stream decode speed with and without speculative decoding.

    python benchmarks/spec_decode.py ngram [--dtype auto] [--k 4] [--max-tokens 128]
    python benchmarks/spec_decode.py draft [--dtype float32] [--draft-type Q4_0 | --draft PATH]

``ngram``: prompt lookup on input-grounded prompts (quote, edit code, summarize with the
passage's words). ``draft``: the embedded model as the target (float32 by default) and the same
model written by ``kvforge quantize`` at ``--draft-type`` as the draft, on the same prompts plus
open-ended ones. Both engines run in one process, one greedy request at a time (medians of
``--repeats``); the script prints generated tokens/s, the speed-up and acceptance per draft
position, with the CPU model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvforge import LLM, SamplingParams
from kvforge.config import default_model_path
from kvforge.entrypoints.bench.report import cpu_model

PASSAGE = (
    "The river rises in the northern hills, runs south through three market towns, and "
    "reaches the sea at a wide estuary where salt marshes shelter thousands of birds each "
    "winter. Its water once turned forty mills; today it feeds farms and a city of a million."
)
CODE = (
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
    "    return total / len(values)\n\n"
    "def variance(values):\n    m = mean(values)\n    total = 0\n    for v in values:\n"
    "        total += (v - m) ** 2\n    return total / len(values)\n"
)
GROUNDED = {
    "quote": f"Passage: {PASSAGE}\n\nQuote the passage word for word.\nQuote: The river",
    "edit-code": f"{CODE}\n# The same two functions, with type hints added:\n",
    "summarize": f"Passage: {PASSAGE}\n\nSummarize the passage in two sentences using its words.\n",
}
OPEN = {
    "story": "Write a short story about a lighthouse keeper.",
    "explain": "Explain how a refrigerator works.",
}


def run(llm: LLM, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Seconds and tokens of one greedy generation."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    return time.perf_counter() - start, len(out.token_ids)


def quantized_draft(kind: str, directory: str) -> str:
    """The embedded model written at ``kind`` by ``kvforge quantize``."""
    path = str(Path(directory) / f"draft-{kind}.gguf")
    command = [sys.executable, "-m", "kvforge.entrypoints.cli", "quantize"]
    subprocess.run([*command, default_model_path(), path, kind], check=True)
    return path


def main() -> None:
    """Print one row per prompt and the acceptance statistics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("ngram", "draft"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--dtype", default=None, help="target dtype (ngram: auto, draft: float32)")
    parser.add_argument("--draft", default=None, help="draft model (default: --draft-type)")
    parser.add_argument("--draft-type", default="Q4_0", help="quantize the embedded model to this")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = args.dtype or ("auto" if args.method == "ngram" else "float32")
    with tempfile.TemporaryDirectory() as tmp:
        if args.method == "ngram":
            spec = {"speculative_method": "ngram"}
            prompts = GROUNDED
        else:
            spec = {"speculative_model": args.draft or quantized_draft(args.draft_type, tmp)}
            prompts = {**GROUNDED, **OPEN}
        print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; target dtype {dtype}")
        engines = {
            "plain": LLM(dtype=dtype, show_progress=False),
            args.method: LLM(
                dtype=dtype, show_progress=False, num_speculative_tokens=args.k, **spec
            ),
        }
        for llm in engines.values():
            run(llm, "Hello", 8)
        print(f"{'prompt':<10} {'plain tok/s':>12} {args.method + ' tok/s':>12} {'speed-up':>9}")
        for name, prompt in prompts.items():
            rates = {}
            for label, llm in engines.items():
                samples = []
                for _ in range(args.repeats):
                    seconds, tokens = run(llm, prompt, args.max_tokens)
                    samples.append(tokens / seconds)
                rates[label] = sorted(samples)[len(samples) // 2]
            speedup = rates[args.method] / rates["plain"]
            print(
                f"{name:<10} {rates['plain']:>12.1f} {rates[args.method]:>12.1f} {speedup:>8.2f}x"
            )
        stats = engines[args.method].engine.scheduler.spec_stats
        print(
            f"drafts: {stats.num_draft_tokens} proposed, acceptance {stats.acceptance_rate:.2f}, "
            f"mean accepted length {stats.mean_accepted_length:.2f}, per position "
            + ", ".join(f"{r:.2f}" for r in stats.position_rates())
        )


if __name__ == "__main__":
    main()
