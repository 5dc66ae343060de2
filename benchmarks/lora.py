"""Throughput of a batch whose requests use several LoRA adapters against the base model alone.

    python benchmarks/lora.py [--adapters 4] [--batch 16] [--max-tokens 128] [--rank 16]

Random PEFT adapters (every projection, rank ``--rank``) for the embedded model are written to a
temporary directory; ``--batch`` greedy requests (random-word prompts) run at once, first on the
base model, then spread round-robin over ``--adapters`` adapters, in one process. Prints
generated tokens/s of each, the ratio and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvforge import LLM, LoRARequest, SamplingParams
from kvforge.entrypoints.bench.report import cpu_model
from kvforge.lora.adapter import TARGETS, module_path


def write_random_adapter(llm: LLM, directory: Path, rank: int, seed: int) -> None:
    """A PEFT adapter with small random A and B on every projection of every layer."""
    model = llm.engine.runner.model
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(len(model.layers)):
        for target in TARGETS:
            module = module_path(i, target)
            linear, shard = model.lora_target(module)
            prefix = f"base_model.model.model.{module}"
            a = torch.randn(rank, linear.in_features, generator=generator) * 0.01
            b = torch.randn(linear.shard_sizes[shard], rank, generator=generator) * 0.01
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(TARGETS)}
    (directory / "adapter_config.json").write_text(json.dumps(config))


def rate(llm: LLM, prompts: list[str], params: SamplingParams, loras: list) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(
        enable_lora=True,
        max_loras=max(1, args.adapters),
        max_lora_rank=args.rank,
        show_progress=False,
    )
    rng = random.Random(0)
    words = [
        "river",
        "town",
        "market",
        "bird",
        "winter",
        "water",
        "farm",
        "city",
        "mill",
        "sea",
        "salt",
        "marsh",
        "hill",
    ]
    prompts = [" ".join(rng.choice(words) for _ in range(32)) for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for i in range(args.adapters):
            path = Path(tmp) / f"adapter{i}"
            write_random_adapter(llm, path, args.rank, seed=i)
            adapters.append(LoRARequest(f"adapter{i}", i + 1, str(path)))
        loras = [adapters[i % len(adapters)] if adapters else None for i in range(args.batch)]
        print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads")
        rate(llm, prompts[:2], SamplingParams(max_tokens=4), loras[:2])  # warm-up, loads
        base, mixed = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both
            base.append(rate(llm, prompts, params, [None] * args.batch))
            mixed.append(rate(llm, prompts, params, loras))
        b, m = sorted(base)[len(base) // 2], sorted(mixed)[len(mixed) // 2]
        print(f"{args.batch} requests x {args.max_tokens} tokens, median of {args.repeats}:")
        print(f"  base model        {b:8.1f} tok/s")
        print(f"  {args.adapters} adapters (r={args.rank}) {m:8.1f} tok/s  ({m / b:.2f}x)")


if __name__ == "__main__":
    main()
