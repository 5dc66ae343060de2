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


# The projection (docs/parallelism.md): decode steps of B tokens on N ranks. A rank's share of
# a step = reading its weights once (decode is memory-bound) + its collectives, each costing
# alpha (latency per message step) + bytes / beta. The bytes per token and layer are the
# measured ones, in units of one hidden vector (E x dtype bytes): TP ~2 per rank (two
# all-reduces; a ring moves 2 (n-1)/n of each per rank), EP ~2K + 1 per token (pairs out and
# back, then the gather of every rank's slice), PP 1 per token per stage boundary.
MODELS = {  # name: (hidden E, layers L, attention+embedding GB, expert/MLP GB, routed K)
    "70B dense": (8192, 80, 20.0, 120.0, 0),
    "8x7B MoE, 2 of 8": (4096, 32, 3.0, 90.0, 2),
}
NEAR = (8e-6, 200e9)  # in a node (NVLink class): alpha s, beta B/s
FAR = (20e-6, 20e9)  # across nodes (200 Gb/s)
HBM = 3.0e12  # B/s at which a rank reads its weights
NODE = 8  # ranks per node


def _ring(ranks: int, nbytes: float, link: tuple[float, float]) -> float:
    alpha, beta = link
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes / beta


def project(batch: int = 64) -> None:
    """Print projected decode throughput (tokens/s) at 8-64 ranks for each split."""
    print(f"projection: decode steps of {batch} tokens, bf16, weights read at {HBM / 1e12} TB/s")
    for model, (hidden, layers, dense_gb, mlp_gb, top_k) in MODELS.items():
        vector = batch * hidden * 2.0  # the step's hidden states, bytes
        weights = (dense_gb + mlp_gb) * 1e9
        for ranks in (8, 16, 32, 64):
            # TP over all ranks: two all-reduces per layer, across nodes past one node
            tp = weights / ranks / HBM + layers * 2 * _ring(
                ranks, vector, NEAR if ranks <= NODE else FAR
            )
            # TP inside each node, nodes as pipeline stages: with one micro-batch of B tokens
            # per stage in flight, a stage finishes one every "stage" seconds
            stages = max(1, ranks // NODE)
            stage = (
                weights / ranks / HBM
                + layers / stages * 2 * _ring(NODE, vector, NEAR)
                + (FAR[0] + vector / FAR[1] if stages > 1 else 0.0)
            )
            rows = [f"TP {batch / tp:7.0f}", f"TP{NODE}xPP{stages} {batch / stage:7.0f}"]
            if top_k:
                # attention TP inside a node (replicated per node), experts over all ranks:
                # all-to-all out and back (K vectors per token of the rank's slice), a gather
                # (messages to all peers go out together: alpha once, plus 1 us per peer)
                alpha = FAR[0] + (ranks - 1) * 1e-6
                a2a = 2 * (alpha + 2 * top_k * vector / ranks / FAR[1])
                gather = alpha + vector * (ranks - 1) / ranks / FAR[1]
                ep = (
                    dense_gb * 1e9 / NODE / HBM
                    + mlp_gb * 1e9 / ranks / HBM
                    + layers * (_ring(NODE, vector, NEAR) + a2a + gather)
                )
                rows.append(f"TP{NODE}xEP{ranks} {batch / ep:7.0f}")
            print(f"  {model:17} N={ranks:2}: " + "   ".join(rows))


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
    project()
    print("gloo all-reduce, 2 local processes:")
    for size, seconds in _allreduce_times():
        print(
            f"  {size / 1024:8.0f} KiB  {seconds * 1e6:9.1f} us  {size / seconds / 1e9:6.2f} GB/s"
        )


if __name__ == "__main__":
    main()
