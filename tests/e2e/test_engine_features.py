"""Engine features end to end on the embedded model."""

from __future__ import annotations

import pytest

from kvforge.errors import ContextLengthError, InvalidRequestError
from kvforge.sampling_params import SamplingParams
from tests.helpers import run_to_completion


def test_shared_500_token_prefix_is_served_from_cache(make_engine):
    engine = make_engine()
    words = " ".join(f"item{i}" for i in range(400))
    prefix_ids = engine.tokenizer.encode(f"Here is a long list: {words}")[:500]
    assert len(prefix_ids) == 500
    params = SamplingParams(temperature=0, max_tokens=2)
    engine.add_request(
        prefix_ids + engine.tokenizer.encode(" First question?", False), params, request_id="a"
    )
    run_to_completion(engine)
    second = prefix_ids + engine.tokenizer.encode(" Second question, longer?", False)
    engine.add_request(second, params, request_id="b")
    first_step = engine.scheduler.schedule()
    # Only the uncached tail is computed: 500 // 16 * 16 = 496 tokens come from the cache.
    [(request_id, num_new)] = first_step.num_scheduled_tokens.items()
    request = engine.scheduler.requests[request_id]
    assert request.num_cached_tokens >= 496
    assert num_new == len(second) - request.num_cached_tokens
    engine.scheduler.update(first_step, engine.runner.execute(first_step))
    outputs = run_to_completion(engine)
    assert outputs["b"].num_cached_tokens >= 496
    assert outputs["b"].metrics.num_cached_tokens >= 496
    # Same result as without any cache.
    fresh = make_engine(enable_prefix_caching=False)
    fresh.add_request(second, params, request_id="b")
    assert run_to_completion(fresh)["b"].outputs[0].token_ids == outputs["b"].outputs[0].token_ids


def test_n_samples_share_prompt_blocks(make_engine):
    engine = make_engine(enable_prefix_caching=False)
    prompt = engine.tokenizer.encode("Tell me a short story about a dragon. " * 6)
    num_full = (len(prompt) - 1) // 16
    engine.add_request(
        prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8), request_id="s"
    )
    pool = engine.kv_cache_manager.pool
    saw_sharing = False
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
        children = [r for r in engine.scheduler.running if r.request_id.startswith("s#")]
        if len(children) == 4:
            shared = children[0].block_ids[:num_full]
            assert all(c.block_ids[:num_full] == shared for c in children)
            assert all(pool.ref_cnt[b] == 4 for b in shared)
            private = sum(len(c.block_ids) - num_full for c in children)
            assert pool.num_in_use == num_full + private  # not 4x the prompt
            saw_sharing = True
        engine.kv_cache_manager.check_integrity()
    assert saw_sharing
    completions = outputs["s"].outputs
    assert len(completions) == 4 and len({tuple(c.token_ids) for c in completions}) > 1
    assert pool.num_in_use == 0


def test_seeded_sampling_is_reproducible_across_batches(make_engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=10)
    alone = make_engine()
    alone.add_request("Describe a sunset.", params, request_id="x")
    expected = run_to_completion(alone)["x"].outputs[0].token_ids
    crowded = make_engine()
    for i in range(5):
        crowded.add_request(f"Other prompt {i}", SamplingParams(temperature=1.0, max_tokens=10))
    crowded.add_request("Describe a sunset.", params, request_id="x")
    assert run_to_completion(crowded)["x"].outputs[0].token_ids == expected


def test_best_of_keeps_the_most_likely(make_engine):
    engine = make_engine()
    engine.add_request(
        "Name a color.",
        SamplingParams(n=2, best_of=4, temperature=1.0, seed=1, max_tokens=6),
        request_id="b",
    )
    out = run_to_completion(engine)["b"]
    assert len(out.outputs) == 2
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob


def test_logprobs_and_prompt_logprobs(make_engine):
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    engine.add_request("The capital of France is", params, request_id="l")
    out = run_to_completion(engine)["l"]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        assert entry[token_id].rank == 1  # greedy picks the top token
        assert 3 <= len(entry) <= 4
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token_id, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token_id in entry
    total = sum(entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs))
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_stop_strings_and_stop_tokens(make_engine):
    engine = make_engine()
    prompt = engine.tokenizer.encode_chat(
        [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    )
    base = SamplingParams(temperature=0, max_tokens=40)
    engine.add_request(prompt, base, request_id="free")
    free = run_to_completion(engine)["free"].outputs[0]
    assert "4" in free.text
    stop_at = free.text.index("4")
    engine.add_request(
        prompt, SamplingParams(temperature=0, max_tokens=40, stop=["4"]), request_id="s"
    )
    stopped = run_to_completion(engine)["s"].outputs[0]
    assert stopped.text == free.text[:stop_at]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "4"
    engine.add_request(
        prompt,
        SamplingParams(temperature=0, max_tokens=40, stop=["4"], include_stop_str_in_output=True),
        request_id="i",
    )
    assert run_to_completion(engine)["i"].outputs[0].text == free.text[: stop_at + 1]
    stop_token = free.token_ids[3]
    engine.add_request(
        prompt,
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token]),
        request_id="t",
    )
    by_token = run_to_completion(engine)["t"].outputs[0]
    assert by_token.token_ids == free.token_ids[: free.token_ids.index(stop_token) + 1]
    assert by_token.stop_reason == stop_token
    assert engine.kv_cache_manager.pool.num_in_use == 0


def test_min_tokens_and_eos(make_engine):
    engine = make_engine()
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=50), request_id="a")
    natural = run_to_completion(engine)["a"].outputs[0]
    assert natural.finish_reason == "stop"
    longer = len(natural.token_ids) + 5
    engine.add_request(
        prompt, SamplingParams(temperature=0, max_tokens=50, min_tokens=longer), request_id="b"
    )
    forced = run_to_completion(engine)["b"].outputs[0]
    assert len(forced.token_ids) >= longer
    assert engine.tokenizer.eos_token_id not in forced.token_ids[:longer]


def test_abort_frees_blocks_and_others_continue(make_engine):
    engine = make_engine()
    engine.add_request(
        "Write a long essay about the ocean.", SamplingParams(max_tokens=50), request_id="gone"
    )
    engine.add_request(
        "Write a poem.", SamplingParams(temperature=0, max_tokens=5), request_id="kept"
    )
    engine.step()
    engine.step()
    engine.abort_request("gone")
    engine.kv_cache_manager.check_integrity()
    outputs = run_to_completion(engine)
    assert "gone" not in outputs and outputs["kept"].finished
    assert engine.kv_cache_manager.pool.num_in_use == 0


def test_bad_input_raises_typed_errors(make_engine):
    engine = make_engine(max_model_len=64)
    with pytest.raises(ContextLengthError, match="64"):
        engine.add_request("word " * 100, SamplingParams())
    with pytest.raises(ContextLengthError, match="max_tokens"):
        engine.add_request("hi", SamplingParams(max_tokens=100))
    with pytest.raises(InvalidRequestError):
        engine.add_request([10**9], SamplingParams())
    with pytest.raises(InvalidRequestError):
        engine.add_request("hi", SamplingParams(logit_bias={10**9: 1.0}))
    with pytest.raises(InvalidRequestError):
        engine.add_request("", SamplingParams())
    assert not engine.has_unfinished_requests()


def test_llm_api_generate_and_chat(smollm, make_engine):
    from kvforge import LLM

    llm = LLM.__new__(LLM)  # reuse the loaded model: construct around an engine
    llm.engine = make_engine()
    outputs = llm.generate(
        ["Hello, my name is", "The sky is"],
        SamplingParams(temperature=0, max_tokens=5),
        use_tqdm=False,
    )
    assert [o.prompt for o in outputs] == ["Hello, my name is", "The sky is"]
    assert all(len(o.outputs[0].token_ids) == 5 and o.outputs[0].text for o in outputs)
    replies = llm.chat(
        [
            [{"role": "user", "content": "What is 2+2?"}],
            [{"role": "user", "content": "What is the capital of France?"}],
        ],
        SamplingParams(temperature=0, max_tokens=20),
        use_tqdm=False,
    )
    assert "Paris" in replies[1].outputs[0].text
    assert replies[0].metrics.time_to_first_token is not None
