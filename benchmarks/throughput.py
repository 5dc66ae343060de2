"""Offline throughput: N prompts of a given length, M generated tokens each.

python benchmarks/throughput.py --num-prompts 32 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import time

from kvforge import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--kv-cache-recent-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    args = parser.parse_args()
    llm = LLM(
        args.model,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_recent_blocks=args.kv_cache_recent_blocks,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory="2GiB",
    )
    tokenizer = llm.get_tokenizer()
    base = tokenizer.encode(
        "The history of computing is long and varied. " * 64, add_special_tokens=False
    )
    prompts = [
        [(t + i) % tokenizer.vocab_size for t in base[: args.input_len]]
        for i in range(args.num_prompts)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    print(f"requests: {len(outputs)}  time: {elapsed:.2f}s")
    print(f"prompt tokens: {prompt_tokens}  generated tokens: {generated}")
    print(
        f"throughput: {len(outputs) / elapsed:.2f} req/s, {(prompt_tokens + generated) / elapsed:.1f} tok/s total, "
        f"{generated / elapsed:.1f} generated tok/s"
    )


if __name__ == "__main__":
    main()
