"""Tiny KV caches on the embedded float32 model: eviction, preemption, prefix-cache hits,
identical sequences computed at the same time (their blocks deduplicated) and forked samples
keep every output equal to the same request run alone; the block bookkeeping is checked after
every step and no block leaks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from kvforge.engine import LLMEngine
from kvforge.sampling_params import SamplingParams
from tests.helpers import run_to_completion

PREFIX = "Here are some facts about the natural world, written down for a school project:"
ENGINE_FLAGS = {"dtype": "float32", "block_size": 4}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

Work = list[tuple[str, list[int], SamplingParams]]


def prompts(engine: LLMEngine) -> list[list[int]]:
    """Three 19-token prompts sharing a 16-token (4-block) prefix."""
    prefix = engine.tokenizer.encode(PREFIX)
    return [prefix + engine.tokenizer.encode(f" fact {topic}:", False) for topic in "ABC"]


def token_ids(output: Any) -> list[list[int]]:
    return [list(c.token_ids) for c in output.outputs]


@pytest.fixture(scope="module")
def solo_runs(make_engine: Callable[..., LLMEngine]) -> Callable[[list[int], SamplingParams], Any]:
    """The token ids of a request run alone in a big pool (memoized)."""
    cache: dict[tuple[Any, ...], list[list[int]]] = {}

    def run(prompt: list[int], params: SamplingParams) -> list[list[int]]:
        key = (tuple(prompt), repr(params))
        if key not in cache:
            engine = make_engine(num_blocks=64, **ENGINE_FLAGS)
            engine.add_request(prompt, params, request_id="solo")
            cache[key] = token_ids(run_to_completion(engine)["solo"])
        return cache[key]

    return run


def run_and_compare(engine: LLMEngine, work: Work, solo_runs: Any) -> None:
    """Run ``work`` together with checks after each step; compare with solo runs; no leak."""
    for request_id, prompt, params in work:
        engine.add_request(prompt, params, request_id=request_id)
    outputs = run_to_completion(engine, engine.scheduler.check_integrity)
    kv = engine.kv_cache_manager
    assert kv.pool.num_in_use == 0
    kv.reset_prefix_cache()
    assert kv.pool.num_free_blocks == kv.num_blocks
    for request_id, prompt, params in work:
        assert outputs[request_id].error is None
        assert token_ids(outputs[request_id]) == solo_runs(prompt, params), request_id


def test_eviction_after_identical_sequences_were_cached_twice(make_engine, solo_runs):
    # "a" and "a-again" compute the same tokens in the same steps; "a" finishes first, then
    # "b" (sharing the 4-block prefix) needs blocks and evicts "a"'s cached blocks while
    # "a-again" still runs. Before the fix, "a-again"'s later blocks hung under "a"'s tree
    # nodes without "a-again" holding them: AssertionError "evicting a referenced block".
    engine = make_engine(num_blocks=12, max_num_seqs=2, **ENGINE_FLAGS)
    a, b, _ = prompts(engine)
    work = [
        ("a", a, dataclasses.replace(GREEDY, max_tokens=4)),
        ("a-again", a, GREEDY),
        ("b", b, GREEDY),
    ]
    cache = engine.kv_cache_manager.prefix_cache
    insert = cache.insert
    dedups = []

    def counting_insert(parent, key, block_id):
        node = insert(parent, key, block_id)
        if node.block_id != block_id:
            dedups.append(block_id)
        return node

    cache.insert = counting_insert
    run_and_compare(engine, work, solo_runs)
    assert dedups, "a-again should have adopted a's cached blocks"


def test_preemption_with_shared_prefixes_and_forks(make_engine, solo_runs):
    engine = make_engine(num_blocks=11, max_num_seqs=8, **ENGINE_FLAGS)  # 44 tokens
    a, b, c = prompts(engine)
    work = [
        ("a", a, GREEDY),
        ("a-again", a, GREEDY),
        ("b", b, GREEDY),
        ("twins", c, dataclasses.replace(GREEDY, n=2)),  # identical samples: forked, deduped
        ("seeded", b, SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=8)),
    ]
    run_and_compare(engine, work, solo_runs)  # 7 sequences of up to 27 tokens
    assert engine.num_preemptions > 0
