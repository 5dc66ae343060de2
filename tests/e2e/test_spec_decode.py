"""Speculative decoding (n-gram lookup) on the embedded model: greedy output is token-identical
with and without it, alone, in mixed batches and under preemption; the KV bookkeeping holds
after every step; drafts are really proposed and accepted."""

from __future__ import annotations

import pytest

from kvforge.sampling_params import SamplingParams, StructuredOutputsParams
from tests.helpers import run_to_completion

# Input-grounded prompts (copying, editing): n-gram lookup finds what to propose.
PROMPTS = [
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape. "
    "List: apple, banana,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "# The same functions with type hints:\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Copy the sentence: 'Rivers carry water from the mountains to the sea.' Copy:",
]
SPEC = {"speculative_method": "ngram", "num_speculative_tokens": 4}


def generate(engine, prompts, params_list, check=True) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p, params in zip(prompts, params_list)]

    def integrity() -> None:
        engine.scheduler.check_integrity()

    outputs = run_to_completion(engine, integrity if check else None)
    assert engine.kv_cache_manager.pool.num_in_use == 0
    return [outputs[i].outputs[0].token_ids for i in ids]


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(make_engine) -> list[list[int]]:
    engine = make_engine()
    return [generate(engine, [p], [GREEDY])[0] for p in PROMPTS]


def test_alone_equals_without_speculation(make_engine, reference):
    engine = make_engine(**SPEC)
    outputs = [generate(engine, [p], [GREEDY])[0] for p in PROMPTS]
    assert outputs == reference
    stats = engine.scheduler.spec_stats
    assert stats.num_accepted_tokens > 20, stats  # drafts were proposed and many held
    assert 0 < stats.acceptance_rate <= 1


@pytest.mark.parametrize(
    "flags",
    [{}, {"num_blocks": 14}, {"max_num_batched_tokens": 24}],
    ids=["batch", "preemption", "small-budget"],
)
def test_mixed_batch_equals_without_speculation(make_engine, reference, flags):
    engine = make_engine(**SPEC, speculative_disable_by_batch_size=0, **flags)
    # Greedy requests that speculate next to requests that do not (random sampling with a
    # seed, a JSON-constrained one): the greedy ones must not change.
    prompts = PROMPTS + ["Tell me about cats.", "Give a JSON object with a name."]
    params = [GREEDY] * len(PROMPTS) + [
        SamplingParams(temperature=0.8, seed=3, max_tokens=30),
        SamplingParams(
            temperature=0,
            max_tokens=30,
            structured_outputs=StructuredOutputsParams(json={"type": "object"}),
        ),
    ]
    outputs = generate(engine, prompts, params)
    assert outputs[: len(PROMPTS)] == reference
    if "num_blocks" in flags:
        assert engine.num_preemptions > 0
    assert engine.scheduler.spec_stats.num_verifications > 0


def test_fast_path_equals_without_speculation(make_fast_engine):
    plain = make_fast_engine()
    spec = make_fast_engine(**SPEC)
    for prompt in PROMPTS[:2]:
        assert generate(spec, [prompt], [GREEDY]) == generate(plain, [prompt], [GREEDY])


def test_logprobs_stops_and_limits_with_speculation(make_engine):
    engine = make_engine(**SPEC)
    plain = make_engine()
    cases = [
        SamplingParams(temperature=0, max_tokens=7, logprobs=2),  # max_tokens mid-draft
        SamplingParams(temperature=0, max_tokens=40, stop=["elderberry"]),
        SamplingParams(temperature=0, max_tokens=40, min_tokens=30),
    ]
    for params in cases:
        a_id = engine.add_request(PROMPTS[0], params)
        a = run_to_completion(engine)[a_id].outputs[0]
        b_id = plain.add_request(PROMPTS[0], params)
        b = run_to_completion(plain)[b_id].outputs[0]
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.finish_reason == b.finish_reason
        if params.logprobs:
            assert a.logprobs is not None and b.logprobs is not None
            assert len(a.logprobs) == len(a.token_ids)
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.keys() == y.keys()
                for token_id in x:
                    assert x[token_id].logprob == pytest.approx(y[token_id].logprob, abs=1e-4)


def test_seeded_sampling_is_reproducible_with_speculation(make_engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=30)
    runs = [generate(make_engine(**SPEC), [PROMPTS[0]], [params])[0] for _ in range(2)]
    assert runs[0] == runs[1]
