"""The invariance tests on the default fast path (packed weights, bf16 kernels, C++ attention).

Batching, chunking, prefix caching and preemption change how the fast kernels block their
sums, so bf16 rounding may differ in the last bits. The tolerance stated here: every logprob
of the sequence within ``LOGPROB_TOL`` nats of the request run alone, and the greedy tokens
equal up to the first position where the alone run's top two tokens were within
``NEAR_TIE`` nats (a near tie that such rounding can flip); after a flip the sequences are
different continuations and are not compared further.
"""

from __future__ import annotations

import pytest

from kvforge.sampling_params import SamplingParams
from tests.e2e.test_invariance import FLAGS, make_prompts
from tests.helpers import run_to_completion

MAX_TOKENS = 8
LOGPROB_TOL = 0.1  # observed: at most 0.06 over these 32 prompts x 8 tokens
NEAR_TIE = 0.1  # observed flips: top-2 gaps of 0.043

Run = list[tuple[list[int], list[dict[int, float]]]]


def generate(engine, prompts, check=None) -> Run:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = run_to_completion(engine, check)
    assert engine.kv_cache_manager.pool.num_in_use == 0
    runs = []
    for request_id in ids:
        completion = outputs[request_id].outputs[0]
        logprobs = [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]
        runs.append((completion.token_ids, logprobs))
    return runs


def assert_close(batched: Run, alone: Run) -> None:
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(batched, alone):
        for i, (token, ref_token) in enumerate(zip(tokens, ref_tokens)):
            top = sorted(ref_logprobs[i].values(), reverse=True)
            if token != ref_token:
                assert top[0] - top[1] < NEAR_TIE, (i, tokens, ref_tokens, top)
                break
            diff = abs(logprobs[i][token] - ref_logprobs[i][token])
            assert diff < LOGPROB_TOL, (i, token, diff)


@pytest.fixture(scope="module")
def alone(make_fast_engine) -> Run:  # type: ignore[no-untyped-def]
    engine = make_fast_engine(enable_prefix_caching=False)
    return [generate(engine, [p])[0] for p in make_prompts()]


@FLAGS
def test_fast_batch_of_32_matches_alone(make_fast_engine, alone, flags):  # type: ignore[no-untyped-def]
    engine = make_fast_engine(**flags)
    assert_close(generate(engine, make_prompts(), engine.kv_cache_manager.check_integrity), alone)


def test_fast_preemption_matches_alone(make_fast_engine, alone):  # type: ignore[no-untyped-def]
    engine = make_fast_engine(num_blocks=24)
    batched = generate(engine, make_prompts(), engine.kv_cache_manager.check_integrity)
    assert engine.num_preemptions > 0
    assert_close(batched, alone)


def test_fast_path_uses_the_fast_kernels(smollm_packed) -> None:  # type: ignore[no-untyped-def]
    from kvforge.ops.extension import load_extension

    backend = type(smollm_packed.model.layers[0].self_attn.backend).__name__
    expected = "CpuPagedAttentionBackend" if load_extension().module else "TorchRefAttentionBackend"
    assert backend == expected
