"""Tensor, pipeline and expert parallelism on gloo: speed, greedy agreement, and the bytes each
kind of split sends per token and layer (the numbers docs/parallelism.md projects from).

    python benchmarks/parallel.py [--prompts 8] [--prompt-words 48] [--max-tokens 32]

Runs, in one go on this machine, the embedded model (float32: the exact path) in one process,
with TP=3 (its 9 heads and 3 KV heads split 3 ways) and with PP=2, and the embedded model
upcycled into 6 experts (2 active) in one process, with EP=2 and with TP=3 x EP=3. For each split it prints generated tokens/s, whether
the greedy tokens equal one process's, and the bytes sent per token per layer by kind (summed
over ranks; an all-reduce or all-gather counts its input once per rank). Then it times gloo's
all-reduce between two local processes (latency and bandwidth) for the projection. Prints the
CPU model: compare ratios from one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvforge import LLM, SamplingParams
from kvforge.config import default_model_path
from kvforge.entrypoints.bench.report import cpu_model
from kvforge.tools.upcycle import upcycle

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "which",
    "or",
]


def _prompts(count: int, words: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def _run(model: str, prompts: list[str], max_tokens: int, **options: object) -> dict[str, object]:
    llm = LLM(model, dtype="float32", show_progress=False, max_num_seqs=len(prompts), **options)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    try:
        llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
        runner = llm.engine.runner
        before = runner.traffic() if hasattr(runner, "traffic") else []
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        after = runner.traffic() if hasattr(runner, "traffic") else []
        layers = llm.engine.runner.model_config.num_layers
    finally:
        llm.shutdown()
    tokens = [o.outputs[0].token_ids for o in outputs]
    computed = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs)
    sent: dict[str, int] = {}
    for old, new in zip(before, after):
        for kind, value in new.items():
            sent[kind] = sent.get(kind, 0) + value - old.get(kind, 0)
    return {
        "tokens": tokens,
        "tok_s": sum(len(t) for t in tokens) / elapsed,
        "per_token_layer": {k: v / computed / layers for k, v in sorted(sent.items())},
        "computed": computed,
    }


def _allreduce_rank(rank: int, port: int, sizes: list[int], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    rows = []
    for size in sizes:
        x = torch.ones(size // 4)
        for _ in range(3):
            dist.all_reduce(x)
        repeats = 20
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        rows.append((size, (time.perf_counter() - start) / repeats))
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def _allreduce_times() -> list[tuple[int, float]]:
    from kvforge.parallel.executor import _free_port

    sizes = [4 << 10, 64 << 10, 1 << 20, 8 << 20]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.pt")
        mp.start_processes(
            _allreduce_rank, args=(_free_port(), sizes, out), nprocs=2, start_method="spawn"
        )
        return torch.load(out)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch threads {torch.get_num_threads()}")
    prompts = _prompts(args.prompts, args.prompt_words)
    dense = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        moe = str(Path(tmp) / "upcycled-6x2.gguf")
        upcycle(dense, moe, num_experts=6, num_active=2, show_progress=False)
        # SmolLM2-135M has 9 heads and 3 KV heads: tensor parallelism over 3 ranks
        cases = [
            ("dense", dense, {}),
            ("dense", dense, {"tensor_parallel_size": 3}),
            ("dense", dense, {"pipeline_parallel_size": 2}),
            ("moe 6x2", moe, {}),
            ("moe 6x2", moe, {"expert_parallel_size": 2}),
            ("moe 6x2", moe, {"tensor_parallel_size": 3, "enable_expert_parallel": True}),
        ]
        baseline: dict[str, dict[str, object]] = {}
        print(
            f"{'model':8} {'split':34} {'tok/s':>7} {'ratio':>6} {'greedy':>6}  bytes/token/layer"
        )
        for name, path, options in cases:
            result = _run(path, prompts, args.max_tokens, **options)
            base = baseline.setdefault(name, result)
            split = ", ".join(f"{k}={v}" for k, v in options.items()) or "one process"
            traffic = result["per_token_layer"]
            assert isinstance(traffic, dict)
            print(
                f"{name:8} {split:34} {result['tok_s']:7.1f} "
                f"{float(result['tok_s']) / float(base['tok_s']):6.2f} "  # type: ignore[arg-type]
                f"{'same' if result['tokens'] == base['tokens'] else 'DIFF':>6}  "
                + " ".join(f"{k} {v:,.0f} B" for k, v in traffic.items())
            )
    print("gloo all-reduce, 2 local processes:")
    for size, seconds in _allreduce_times():
        print(
            f"  {size / 1024:8.0f} KiB  {seconds * 1e6:9.1f} us  {size / seconds / 1e9:6.2f} GB/s"
        )


if __name__ == "__main__":
    main()
