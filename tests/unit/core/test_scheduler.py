"""Scheduler + KV cache manager simulated without a model (block size 4, vocab 64)."""

from __future__ import annotations

import random

import pytest

from kvforge.config import SchedulerConfig
from kvforge.core import KVCacheManager, ModelRunnerOutput, Scheduler, SchedulerOutput
from kvforge.request import Request, RequestStatus
from kvforge.sampling_params import SamplingParams

VOCAB = 64
EOS = 0


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8, **kwargs) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=max_tokens),
        eos_token_ids=frozenset({EOS}),
        max_tokens=max_tokens,
        **kwargs,
    )


def make_scheduler(num_blocks: int = 64, caching: bool = True, **config) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size=4, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(**config), kv, max_model_len=256)


def next_token(tokens: list[int]) -> int:
    """A deterministic fake model: the next token depends on the whole history."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) % (VOCAB - 1)) + 1


def fake_run(scheduler: Scheduler, output: SchedulerOutput) -> ModelRunnerOutput:
    result = ModelRunnerOutput()
    for request_id, num_new in output.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        if request.num_computed_tokens + num_new == request.num_tokens:
            result.add(request_id, [next_token(request.all_token_ids)], [-0.5])
    return result


def run(scheduler: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        assert out.num_batched_tokens <= scheduler.config.max_num_batched_tokens
        scheduler.update(out, fake_run(scheduler, out))
        scheduler.check_integrity()
        outputs.append(out)
    assert not scheduler.has_unfinished_requests()
    return outputs


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))] for _ in range(count)]


def test_all_requests_finish_and_free_every_block():
    scheduler = make_scheduler()
    requests = [make_request(f"r{i}", p) for i, p in enumerate(random_prompts(12))]
    for r in requests:
        scheduler.add_request(r)
    run(scheduler)
    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_output(r.prompt_token_ids, 8)
        assert r.block_ids == []
    assert scheduler.kv.pool.num_in_use == 0


def test_abort_mid_run_frees_blocks():
    scheduler = make_scheduler()
    requests = [make_request(f"r{i}", p, max_tokens=20) for i, p in enumerate(random_prompts(6))]
    for r in requests:
        scheduler.add_request(r)
    for _ in range(3):
        out = scheduler.schedule()
        scheduler.update(out, fake_run(scheduler, out))
        scheduler.check_integrity()
    scheduler.finish_requests([r.request_id for r in requests[:3]], RequestStatus.FINISHED_ABORTED)
    scheduler.check_integrity()
    run(scheduler)
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in requests[:3])
    assert scheduler.kv.pool.num_in_use == 0


def test_chunked_prefill_mixes_with_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    short = make_request("short", [5, 6, 7], max_tokens=10)
    scheduler.add_request(short)
    first = scheduler.schedule()
    scheduler.update(first, fake_run(scheduler, first))
    long = make_request("long", list(range(1, 40)), max_tokens=3)
    scheduler.add_request(long)
    outputs = run(scheduler)
    mixed = [
        o
        for o in outputs
        if set(o.num_scheduled_tokens) == {"short", "long"} and o.num_scheduled_tokens["long"] < 39
    ]
    assert mixed, "the long prompt should be chunked alongside the short request's decodes"
    assert long.output_token_ids == expected_output(long.prompt_token_ids, 3)
    assert short.output_token_ids == expected_output(short.prompt_token_ids, 10)


def test_preemption_recomputes_and_keeps_outputs():
    scheduler = make_scheduler(num_blocks=12)
    requests = [
        make_request(f"r{i}", p, max_tokens=16) for i, p in enumerate(random_prompts(6, seed=1))
    ]
    for r in requests:
        scheduler.add_request(r)
    run(scheduler)
    assert scheduler.num_preemptions > 0
    for r in requests:
        assert r.output_token_ids == expected_output(r.prompt_token_ids, 16)
    assert scheduler.kv.pool.num_in_use == 0


def test_prefix_cache_reuses_full_blocks():
    scheduler = make_scheduler()
    prefix = list(range(1, 22))  # 21 tokens: 5 full blocks of 4
    first = make_request("a", prefix + [30], max_tokens=2)
    scheduler.add_request(first)
    run(scheduler)
    second = make_request("b", prefix + [40, 41], max_tokens=2)
    scheduler.add_request(second)
    out = scheduler.schedule()
    assert second.num_cached_tokens == 20
    assert out.num_scheduled_tokens == {second.request_id: 3}
    scheduler.update(out, fake_run(scheduler, out))
    run(scheduler)
    assert second.output_token_ids == expected_output(second.prompt_token_ids, 2)


def test_cache_salt_isolates_prefixes():
    scheduler = make_scheduler()
    prompt = list(range(1, 30))
    scheduler.add_request(make_request("a", prompt, max_tokens=1, cache_salt="alice"))
    run(scheduler)
    other = make_request("b", prompt, max_tokens=1, cache_salt="bob")
    scheduler.add_request(other)
    scheduler.schedule()
    assert other.num_cached_tokens == 0


def test_eviction_reuses_cached_blocks_when_full():
    scheduler = make_scheduler(num_blocks=10)
    for i, prompt in enumerate(random_prompts(8, seed=3)):
        scheduler.add_request(make_request(f"r{i}", prompt + list(range(1, 12)), max_tokens=2))
        run(scheduler)
    kv = scheduler.kv
    assert kv.pool.num_in_use == 0
    assert kv.prefix_cache.num_cached_blocks > 0
    assert kv.num_available_blocks == 10


def test_forked_samples_share_prompt_blocks_and_copy_on_write():
    scheduler = make_scheduler()
    prompt = list(range(1, 11))  # 10 tokens: blocks [4, 4, 2]
    parent = make_request("p#0", prompt)
    children = [make_request(f"p#{i}", prompt, fork_parent=parent) for i in range(1, 4)]
    parent.num_pending_forks = 3
    for r in [parent, *children]:
        scheduler.add_request(r)
    first = scheduler.schedule()
    assert first.num_scheduled_tokens == {parent.request_id: 9}  # stops one short of the prompt
    scheduler.update(first, fake_run(scheduler, first))
    second = scheduler.schedule()
    assert set(second.num_scheduled_tokens) == {"p#0", "p#1", "p#2", "p#3"}
    shared = parent.block_ids[:2]
    for child in children:
        assert child.block_ids[:2] == shared
    assert all(scheduler.kv.pool.ref_cnt[b] == 4 for b in shared)
    # Everyone writes the last prompt token into the partial third block: 3 copies are made.
    assert len(second.blocks_to_copy) == 3
    assert len({r.block_ids[2] for r in [parent, *children]}) == 4
    scheduler.update(second, fake_run(scheduler, second))
    run(scheduler)
    assert scheduler.kv.pool.num_in_use == 0


def test_priority_policy_admits_lowest_value_first():
    scheduler = make_scheduler(policy="priority", max_num_seqs=1)
    low = make_request("low", [1, 2], priority=5)
    high = make_request("high", [3, 4], priority=-1)
    scheduler.add_request(low)
    scheduler.add_request(high)
    out = scheduler.schedule()
    assert list(out.num_scheduled_tokens) == ["high"]


def test_identical_sequences_computed_together_share_blocks_once_cached():
    # Both compute the same prompt in one step; the second finds the first's blocks cached
    # and adopts them (dropping its duplicates), so it holds every block on its tree path.
    scheduler = make_scheduler(num_blocks=64)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks
    first = make_request("first", prompt, max_tokens=3)
    second = make_request("second", prompt, max_tokens=10)
    scheduler.add_request(first)
    scheduler.add_request(second)
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"first": 13, "second": 13}
    scheduler.update(out, fake_run(scheduler, out))
    scheduler.check_integrity()
    assert second.block_ids[:3] == first.block_ids[:3]
    assert all(scheduler.kv.pool.ref_cnt[b] == 2 for b in first.block_ids[:3])
    assert scheduler.kv.pool.num_in_use == 3 + 2  # shared full blocks + two partial blocks
    run(scheduler)
    assert second.output_token_ids == expected_output(prompt, 10)


def test_eviction_after_the_first_owner_of_shared_blocks_finishes():
    # The reported crash ("evicting a referenced block"): "first" finishes while "second",
    # which computed the same tokens at the same time, keeps decoding; then a request sharing
    # the 4-block prefix needs blocks and evicts "first"'s cached ones.
    scheduler = make_scheduler(num_blocks=12, max_num_seqs=2)
    prompt = list(range(1, 20))
    first = make_request("first", prompt, max_tokens=4)
    second = make_request("second", prompt, max_tokens=8)
    others = [make_request(f"o{i}", prompt[:16] + [40 + i, 41, 42]) for i in range(2)]
    for request in [first, second, *others]:
        scheduler.add_request(request)
    run(scheduler)
    for request in [first, second, *others]:
        assert (
            request.output_token_ids
            == expected_output(request.prompt_token_ids, 8)[: request.max_tokens]
        )
    assert scheduler.kv.pool.num_in_use == 0


def test_integrity_check_counts_each_requests_references():
    scheduler = make_scheduler()
    request = make_request("r", list(range(1, 14)))
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update(out, fake_run(scheduler, out))
    scheduler.check_integrity()
    scheduler.kv.pool.incref(request.block_ids[-1])  # a reference nobody holds: a leak
    with pytest.raises(AssertionError, match="1 holders"):
        scheduler.check_integrity()


def test_forks_never_wait_for_a_batch_slot():
    # With one slot the parent would wait forever for its forks; they compute alone instead.
    scheduler = make_scheduler(max_num_seqs=1)
    prompt = list(range(1, 11))
    parent = make_request("p#0", prompt)
    children = [make_request(f"p#{i}", prompt, fork_parent=parent) for i in range(1, 3)]
    parent.num_pending_forks = 2
    for request in [parent, *children]:
        scheduler.add_request(request)
    run(scheduler)
    for request in [parent, *children]:
        assert request.output_token_ids == expected_output(prompt, 8)


def test_forks_and_long_recomputes_without_chunked_prefill():
    # A fork parent stops one short of its prompt, and a preempted request recomputes prompt
    # plus outputs: neither may wait for a budget it can never get.
    scheduler = make_scheduler(
        num_blocks=12, enable_chunked_prefill=False, max_num_batched_tokens=16
    )
    prompt = list(range(1, 11))
    parent = make_request("p#0", prompt, max_tokens=20)
    child = make_request("p#1", prompt, max_tokens=20, fork_parent=parent)
    parent.num_pending_forks = 1
    rest = [make_request(f"r{i}", p, max_tokens=20) for i, p in enumerate(random_prompts(3))]
    for request in [parent, child, *rest]:
        scheduler.add_request(request)
    run(scheduler)
    assert scheduler.num_preemptions > 0
    assert max(r.num_preemptions for r in [parent, child, *rest]) > 0
    for request in [parent, child, *rest]:
        assert request.output_token_ids == expected_output(request.prompt_token_ids, 20)
