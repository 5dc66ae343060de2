"""Greedy outputs do not depend on batching, prefix caching, chunking or preemption."""

from __future__ import annotations

import pytest

from kvforge.sampling_params import SamplingParams
from tests.helpers import run_to_completion

NUM_PROMPTS = 32
MAX_TOKENS = 6
TOPICS = ["cats", "rivers", "the moon", "bread", "chess", "volcanoes", "music", "trains"]


def make_prompts() -> list[str]:
    prompts = []
    for i in range(NUM_PROMPTS):
        topic = TOPICS[i % len(TOPICS)]
        filler = " Please be brief." * (i % 5)  # mixed lengths
        prompts.append(f"Tell me one fact about {topic} number {i}.{filler}")
    return prompts


def generate(engine, prompts, check=None) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = run_to_completion(engine, check)
    assert engine.kv_cache_manager.pool.num_in_use == 0
    return [outputs[i].outputs[0].token_ids for i in ids]


@pytest.fixture(scope="module")
def alone(make_engine) -> list[list[int]]:
    engine = make_engine(enable_prefix_caching=False)
    return [generate(engine, [p])[0] for p in make_prompts()]


# engine flags that change batching, caching and chunking, but must not change the outputs
FLAGS = pytest.mark.parametrize(
    "flags",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 32},
        {"long_prefill_token_threshold": 32},
    ],
    ids=["batch", "no-prefix-cache", "chunked-32", "long-prefill-32"],
)


@FLAGS
def test_batch_of_32_equals_alone(make_engine, alone, flags):
    engine = make_engine(**flags)
    batched = generate(engine, make_prompts(), engine.kv_cache_manager.check_integrity)
    assert batched == alone


def test_preemption_keeps_outputs(make_engine, alone):
    engine = make_engine(num_blocks=24)  # 384 tokens for 32 prompts: preemption is certain
    batched = generate(engine, make_prompts(), engine.kv_cache_manager.check_integrity)
    assert engine.num_preemptions > 0
    assert batched == alone
