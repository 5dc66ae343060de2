"""Structured output cost: grammar compile times and constrained vs free decode speed.

python benchmarks/structured.py --num-prompts 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import time

from kvforge import LLM, SamplingParams
from kvforge.sampling_params import StructuredOutputsParams

# A typical 10-field record: types, an enum, numeric ranges, a pattern, an array.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string"},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "city": {"type": "string"},
        "country": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "level": {"enum": ["junior", "mid", "senior"]},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": [
        "name",
        "age",
        "email",
        "active",
        "score",
        "city",
        "country",
        "tags",
        "level",
        "zip",
    ],
    "additionalProperties": False,
}
# The same record with every string length-bounded: bounded repetitions cost far more to compile.
BOUNDED = {
    **SCHEMA,
    "properties": {
        **SCHEMA["properties"],
        "name": {"type": "string", "maxLength": 20},
        "email": {"type": "string", "maxLength": 30},
        "city": {"type": "string", "maxLength": 16},
        "country": {"type": "string", "maxLength": 16},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
}


def decode_speed(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens / elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    llm = LLM(args.model, kv_cache_memory="512MiB", show_progress=False)
    engine = llm.engine
    start = time.perf_counter()
    manager = engine.structured_outputs()
    print(
        f"grammar backend start-up (vocabulary tables): {1000 * (time.perf_counter() - start):.1f} ms"
    )
    constraint = StructuredOutputsParams(json=SCHEMA)
    for label, schema in (
        ("10-field schema", SCHEMA),
        ("10-field schema, bounded strings", BOUNDED),
    ):
        start = time.perf_counter()
        manager.compile(StructuredOutputsParams(json=schema))
        print(f"first compile of a {label}: {1000 * (time.perf_counter() - start):.1f} ms")
    start = time.perf_counter()
    manager.compile(constraint)
    print(f"cached compile: {1000 * (time.perf_counter() - start):.3f} ms")
    tok = engine.tokenizer
    prompts = [
        tok.encode_chat([{"role": "user", "content": f"Describe person number {i} as JSON."}])
        for i in range(args.num_prompts)
    ]
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    json_params = SamplingParams(
        temperature=0, max_tokens=args.max_tokens, structured_outputs=constraint
    )
    decode_speed(llm, prompts[:1], free)  # warm-up
    free_speed, free_tokens = decode_speed(llm, prompts, free)
    json_speed, json_tokens = decode_speed(llm, prompts, json_params)
    print(f"unconstrained decode: {free_speed:.1f} tok/s ({free_tokens} tokens)")
    print(f"JSON-constrained decode: {json_speed:.1f} tok/s ({json_tokens} tokens)")
    print(f"constrained / unconstrained: {json_speed / free_speed:.2f}x")


if __name__ == "__main__":
    main()
