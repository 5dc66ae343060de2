"""Single-stream decode speed with and without speculative decoding.

    python benchmarks/spec_decode.py ngram [--dtype auto] [--k 4] [--max-tokens 128]
    python benchmarks/spec_decode.py draft [--dtype float32] [--draft-type Q4_0 | --draft PATH]

``ngram``: prompt lookup on the input-grounded chat requests of ``prompts/grounded.jsonl``
(copy a passage, add type hints to code, quote a sentence, summarize with the passage's
words). ``draft``: the embedded model as the target (float32 by default) and the same
model written by ``kvforge quantize`` at ``--draft-type`` as the draft, on the same prompts plus
open-ended ones. Both engines run in one process, one greedy chat request at a time (medians of
``--repeats``; the replies are the same tokens with and without speculation); the script prints generated tokens/s, the speed-up and acceptance per draft
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
from kvforge.entrypoints.bench.offline import load_prompt_file
from kvforge.entrypoints.bench.report import cpu_model

PROMPTS = Path(__file__).parent / "prompts"
# Input-grounded chat requests (copy a passage, add type hints to code, quote a sentence,
# summarize with the passage's words) and open-ended ones; the same files feed
# ``kvforge bench latency --prompt-file``.
GROUNDED = dict(load_prompt_file(str(PROMPTS / "grounded.jsonl")))
OPEN = dict(load_prompt_file(str(PROMPTS / "open.jsonl")))


def run(llm: LLM, messages: list[dict], max_tokens: int) -> tuple[float, int]:
    """Seconds and tokens of one greedy chat reply (the same tokens with and without
    speculation, so the rates compare)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    out = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
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
    parser.add_argument("--ngram-min", type=int, default=1, help="ngram_prompt_lookup_min")
    parser.add_argument("--ngram-max", type=int, default=4, help="ngram_prompt_lookup_max")
    parser.add_argument("--dtype", default=None, help="target dtype (ngram: auto, draft: float32)")
    parser.add_argument("--draft", default=None, help="draft model (default: --draft-type)")
    parser.add_argument("--draft-type", default="Q4_0", help="quantize the embedded model to this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="also run this many requests at once: plain, the default policy, always speculate",
    )
    args = parser.parse_args()
    dtype = args.dtype or ("auto" if args.method == "ngram" else "float32")
    with tempfile.TemporaryDirectory() as tmp:
        if args.method == "ngram":
            spec = {
                "speculative_method": "ngram",
                "ngram_prompt_lookup_min": args.ngram_min,
                "ngram_prompt_lookup_max": args.ngram_max,
            }
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
            run(llm, [{"role": "user", "content": "Hello"}], 8)
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
        print(engines[args.method].engine.scheduler.spec_stats.summary())
        if args.batch:
            batch_rows(dtype, spec, args, list(prompts.values()))


def batch_rows(dtype: str, spec: dict, args: argparse.Namespace, prompts: list[list[dict]]) -> None:
    """Generated tokens/s of ``--batch`` requests at once: where speculation stops paying."""
    print(f"{args.batch} requests at once (the prompts above, repeated):")
    messages = [prompts[i % len(prompts)] for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    variants = {
        "plain": {},
        "policy (off above 4 running)": spec,
        "always": {**spec, "speculative_disable_by_batch_size": 0},
    }
    for label, extra in variants.items():
        llm = LLM(dtype=dtype, show_progress=False, num_speculative_tokens=args.k, **extra)
        llm.chat(messages[:2], params, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.chat(messages, params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        stats = llm.engine.scheduler.spec_stats
        print(
            f"  {label:<30} {tokens / (time.perf_counter() - start):>8.1f} tok/s, "
            f"{stats.num_verifications} verifications, acceptance {stats.acceptance_rate:.2f}"
        )


if __name__ == "__main__":
    main()
