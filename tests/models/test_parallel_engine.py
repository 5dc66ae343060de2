"""The engine over worker processes: tensor, pipeline and expert parallelism on gloo give the
greedy tokens of one process (float32), through ``LLM`` and ``kvforge serve``; a killed rank
fails the engine with a clear error instead of hanging."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kvforge import LLM, SamplingParams
from kvforge.errors import EngineDeadError, InvalidRequestError
from tests.models.tiny_checkpoints import write_checkpoint
from tests.server.conftest import free_port, start_server, stop_server

pytest.importorskip("transformers")

PROMPTS = [
    "the quick brown fox",
    "experts route tokens; the router picks",
    "user: hello there, assistant:",
    "0123456789 + - * / =",
    "the lazy dog jumps over the quick brown fox and then the router picks two experts",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
COMMON = dict(dtype="float32", show_progress=False, num_blocks=96)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random MoE checkpoints: Qwen2-MoE (shared expert, one dense layer) and Mixtral."""
    root = tmp_path_factory.mktemp("parallel")
    paths = {}
    for arch in ("qwen2_moe", "mixtral", "llama"):
        write_checkpoint(arch, root / arch)
        paths[arch] = str(root / arch)
    return paths


_REFERENCE: dict[tuple[str, tuple[tuple[str, object], ...]], list[list[int]]] = {}


def _tokens(path: str, prompts=PROMPTS, params=GREEDY, **options) -> list[list[int]]:
    llm = LLM(path, **{**COMMON, **options})
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()


def _reference(path: str, **options) -> list[list[int]]:
    key = (path, tuple(sorted(options.items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = _tokens(path, **options)
    return _REFERENCE[key]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(tensor_parallel_size=2), id="tp2"),
        pytest.param(dict(pipeline_parallel_size=2), id="pp2"),
        pytest.param(dict(expert_parallel_size=2), id="ep2"),
        pytest.param(dict(tensor_parallel_size=2, enable_expert_parallel=True), id="tp2xep2"),
        pytest.param(
            dict(tensor_parallel_size=2, expert_parallel_size=4),
            id="tp2xep4-4ranks",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            dict(tensor_parallel_size=2, pipeline_parallel_size=2),
            id="tp2xpp2-4ranks",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            dict(pipeline_parallel_size=3, pipeline_micro_batches=4),
            id="pp3-4microbatches",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_split_model_generates_the_tokens_of_one_process(checkpoints, options):
    path = checkpoints["qwen2_moe"]
    assert _tokens(path, **options) == _reference(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("mixtral", dict(tensor_parallel_size=2)),
        ("mixtral", dict(expert_parallel_size=2, pipeline_parallel_size=2)),
        ("llama", dict(tensor_parallel_size=2, pipeline_parallel_size=2)),
    ],
)
def test_other_architectures(checkpoints, arch, options):
    path = checkpoints[arch]
    assert _tokens(path, **options) == _reference(path)


def test_chunked_prefill_and_preemption_with_split_ranks(checkpoints):
    """A small KV pool (requests preempted and recomputed) and small chunks: the workers follow
    every diff of the step contract."""
    path = checkpoints["qwen2_moe"]
    long_prompts = [p * 3 for p in PROMPTS]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    tight = dict(num_blocks=40, block_size=8, max_num_batched_tokens=32)
    one = LLM(path, **{**COMMON, **tight})
    outputs = one.generate(long_prompts, params, use_tqdm=False)
    assert one.engine.num_preemptions > 0
    single = [o.outputs[0].token_ids for o in outputs]
    for options in (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)):
        assert _tokens(path, long_prompts, params, **tight, **options) == single, options


def test_seeded_sampling_matches_one_process(checkpoints):
    """Sampling happens on rank 0 only, from the same logits: seeded requests reproduce."""
    path = checkpoints["qwen2_moe"]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11)
    one = _tokens(path, PROMPTS[:3], params)
    assert _tokens(path, PROMPTS[:3], params, expert_parallel_size=2) == one


def test_expert_counts_and_dropped_pairs(checkpoints):
    """Routing counters sum over the ranks to one process's; a capacity factor drops pairs and
    says how many."""
    path = checkpoints["qwen2_moe"]
    one = LLM(path, **COMMON)
    one.generate(PROMPTS, GREEDY, use_tqdm=False)
    expected = [(s.layer, s.tokens) for s in one.engine.runner.expert_stats()]
    split = LLM(path, **COMMON, expert_parallel_size=2)
    try:
        split.generate(PROMPTS, GREEDY, use_tqdm=False)
        stats = split.engine.runner.expert_stats()
        assert [(s.layer, s.tokens) for s in stats] == expected
        assert all(s.dropped == 0 for s in stats)
    finally:
        split.shutdown()
    capped = LLM(path, **COMMON, expert_parallel_size=2, moe_capacity_factor=0.5)
    try:
        capped.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert sum(s.dropped for s in capped.engine.runner.expert_stats()) > 0
    finally:
        capped.shutdown()


def test_killed_worker_fails_the_engine_quickly(checkpoints):
    llm = LLM(checkpoints["qwen2_moe"], **COMMON, tensor_parallel_size=2)
    victim = llm.engine.runner.procs[1]
    threading.Timer(1.0, lambda: os.kill(victim.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    with pytest.raises(EngineDeadError, match="kvforge-rank1 .* killed by signal 9"):
        llm.generate(PROMPTS * 4, long, use_tqdm=False)
    assert time.monotonic() - start < 30
    assert not any(p.is_alive() for p in llm.engine.runner.procs)
    with pytest.raises(EngineDeadError):  # and stays dead
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)


def test_hung_worker_times_out(checkpoints):
    """A rank that stops answering (SIGSTOP) fails the step after --distributed-timeout."""
    llm = LLM(checkpoints["qwen2_moe"], **COMMON, tensor_parallel_size=2, distributed_timeout=5)
    victim = llm.engine.runner.procs[1]
    try:
        os.kill(victim.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 60
    finally:
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
        llm.shutdown()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tensor_parallel_size=3), "not divisible by the tensor-parallel size 3"),
        (dict(pipeline_parallel_size=5), "at least as many layers"),
        (dict(tensor_parallel_size=2, enable_lora=True), "LoRA adapters are not served"),
        (dict(expert_parallel_size=2, nnodes=2), "master-addr"),
    ],
)
def test_bad_layouts_raise_typed_errors(checkpoints, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        LLM(checkpoints["qwen2_moe"], **COMMON, **options)


@pytest.mark.slow
def test_two_nodes_on_one_machine(checkpoints, tmp_path):
    """--nnodes 2: node 1 (``kvforge serve --node-rank 1``) runs its ranks only; node 0's engine
    drives both."""
    path, port = checkpoints["qwen2_moe"], free_port()
    flags = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "kvforge.entrypoints.cli", "serve", path, "--dtype", "float32"]
        + ["--num-blocks", "96", "-tp", "2", "--node-rank", "1", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        got = _tokens(
            path,
            tensor_parallel_size=2,
            nnodes=2,
            master_addr="127.0.0.1",
            master_port=port,
        )
        assert got == _reference(path)
        assert node1.wait(timeout=30) == 0  # ends with the engine
    finally:
        if node1.poll() is None:
            node1.kill()


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["-tp", "2"], id="tp2"),
        pytest.param(["-pp", "2"], id="pp2", marks=pytest.mark.slow),
        pytest.param(["--expert-parallel-size", "2"], id="ep2", marks=pytest.mark.slow),
        pytest.param(
            ["-tp", "2", "--enable-expert-parallel"], id="tp2xep2", marks=pytest.mark.slow
        ),
    ],
)
def test_serve_with_parallel_workers(checkpoints, tmp_path, flags):
    """`kvforge serve` with split ranks: the same greedy text as one process over HTTP; a
    killed worker turns into an error answer and a server exit that names it, not a hang."""
    path = checkpoints["qwen2_moe"]
    handle = start_server(
        tmp_path, path, "--dtype", "float32", "--num-blocks", "96", *flags, timeout=240
    )
    try:
        body = {
            "model": "qwen2_moe",
            "prompt": PROMPTS[0],
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
        }
        reply = httpx.post(f"{handle.url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert "memory plan (per rank)" in handle.log()
        one = LLM(path, **COMMON)
        expected = one.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].text
        assert reply.json()["choices"][0]["text"] == expected
        pids = [int(line.split("pid ")[1].split(")")[0]) for line in _rank_lines(handle)]
        os.kill(pids[-1], signal.SIGKILL)
        body["max_tokens"] = 200
        failed = httpx.post(f"{handle.url}/v1/completions", json=body, timeout=60)
        assert failed.status_code >= 500 and "error" in failed.json()
        # a dead engine stops the server (for its supervisor to restart), saying why
        handle.process.wait(timeout=60)
        assert re.search(r"engine loop died \(.*kvforge-rank\d .* killed by signal 9", handle.log())
    finally:
        stop_server(handle)


def _rank_lines(handle) -> list[str]:
    return [line for line in handle.log().splitlines() if "rank process" in line]
