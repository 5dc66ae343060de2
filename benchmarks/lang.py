"""Frontend-language programs sharing a few-shot prefix, with and without the prefix cache.

    python benchmarks/lang.py [--programs 64] [--shots 12] [--max-tokens 8]

Runs ``--programs`` copies of a few-shot question-answering program (the same examples, a
different question each) with ``run_batch`` on the in-process engine (embedded model), once
with the radix prefix cache and once without. Prints the cached-token ratio from the programs'
meta info, the wall time of each run and the speed-up, and the CPU model.
"""

from __future__ import annotations

import argparse
import random
import time

from kvforge.entrypoints.bench.report import cpu_model
from kvforge.lang import function, gen
from kvforge.lang.runtime import Engine

CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Ireland", "Dublin"),
    ("Egypt", "Cairo"),
    ("Japan", "Tokyo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
]


@function
def few_shot(s, shots, question, max_tokens):
    s += "Answer each question with the capital city.\n\n"
    for country, capital in shots:
        s += f"Q: What is the capital of {country}?\nA: {capital}\n\n"
    s += f"Q: {question}\nA:" + gen("answer", max_tokens=max_tokens, stop="\n")


def _run(args: argparse.Namespace, caching: bool) -> tuple[float, float]:
    engine = Engine(kv_cache_memory="512MiB", enable_prefix_caching=caching, max_num_seqs=64)
    rng = random.Random(0)
    shots = CAPITALS[: args.shots]
    batch = [
        {
            "shots": shots,
            "question": f"What is the capital of country number {rng.randint(1, 999)}?",
            "max_tokens": args.max_tokens,
        }
        for _ in range(args.programs)
    ]
    try:
        few_shot.run_batch(batch[:2], backend=engine, temperature=0)  # warm up (fills the cache)
        start = time.perf_counter()
        states = few_shot.run_batch(batch, backend=engine, temperature=0, num_threads=64)
        elapsed = time.perf_counter() - start
    finally:
        engine.shutdown()
    prompt = sum(s.meta["prompt_tokens"] for s in states)
    cached = sum(s.meta["cached_tokens"] for s in states)
    return elapsed, cached / prompt if prompt else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--shots", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    cached_time, ratio = _run(args, caching=True)
    plain_time, plain_ratio = _run(args, caching=False)
    print(f"{args.programs} programs, {args.shots}-shot prefix, run_batch on the in-process engine")
    print(f"  prefix cache on : {cached_time:6.2f} s, cached-token ratio {ratio:.1%}")
    print(f"  prefix cache off: {plain_time:6.2f} s, cached-token ratio {plain_ratio:.1%}")
    print(f"  speed-up: {plain_time / cached_time:.2f}x")


if __name__ == "__main__":
    main()
