"""The scheduler -> runner contract: plain picklable data, diffs the runner can follow alone."""

from __future__ import annotations

import pickle
import subprocess
import sys

import torch

from kvforge.config import SchedulerConfig
from kvforge.core import KVCacheManager, ModelRunnerOutput, Scheduler
from kvforge.core.step_io import NewRequestData
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.request import Request
from kvforge.runner.input_batch import InputBatch
from kvforge.sampling_params import SamplingParams


def test_core_does_not_import_torch() -> None:
    code = "import sys, kvforge.core.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _request(request_id: str, prompt: list[int], **kwargs) -> Request:  # type: ignore[no-untyped-def]
    return Request(request_id, prompt, SamplingParams(max_tokens=8), max_tokens=8, **kwargs)


def _sample_all(scheduler: Scheduler, output, token: int) -> ModelRunnerOutput:  # type: ignore[no-untyped-def]
    result = ModelRunnerOutput()
    for request_id, num_new in output.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        if request.num_computed_tokens + num_new == request.num_tokens:
            result.add(request_id, [token], [-1.0])
    return result


def test_new_requests_whole_then_diffs_and_pickles() -> None:
    kv = KVCacheManager(32, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, max_model_len=64)
    scheduler.add_request(_request("a", list(range(1, 8))))
    first = pickle.loads(pickle.dumps(scheduler.schedule()))
    assert [n.request_id for n in first.new_requests] == ["a"]
    assert first.new_requests[0].block_ids == [0, 1] and not first.cached_requests
    scheduler.update(first, _sample_all(scheduler, first, 9))
    second = pickle.loads(pickle.dumps(scheduler.schedule()))
    assert not second.new_requests
    (cached,) = second.cached_requests
    # 7 prompt tokens + 1 sampled: the 8th token fits in the second block, nothing new
    assert cached.num_computed_tokens == 7 and cached.new_block_ids == []
    scheduler.update(second, _sample_all(scheduler, second, 9))
    third = scheduler.schedule()
    assert third.cached_requests[0].new_block_ids == [2]  # position 8 opens a block


def test_preempted_request_is_sent_whole_again() -> None:
    kv = KVCacheManager(4, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, max_model_len=64)
    for request_id in ("a", "b"):
        scheduler.add_request(_request(request_id, list(range(1, 8))))
    seen: set[str] = set()
    resent = 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        for new in out.new_requests:
            live = scheduler.requests[new.request_id]
            assert new.block_ids == live.block_ids
            assert new.output_token_ids == live.output_token_ids
            if new.request_id in seen:  # resumed after preemption: its outputs come along
                assert new.output_token_ids and new.num_computed_tokens == 0
                resent += 1
            seen.add(new.request_id)
        scheduler.update(out, _sample_all(scheduler, out, 9))
    assert scheduler.num_preemptions >= 1 and resent == scheduler.num_preemptions


def test_input_batch_matches_forward_batch_build() -> None:
    batch = InputBatch(block_size=4, rows=1, tokens=4)  # grows rows and columns below
    tables = {"a": [3, 5, 7], "b": [1, 2], "c": [9]}
    prompts = {"a": list(range(10, 21)), "b": list(range(30, 37)), "c": [40, 41]}
    for request_id, prompt in prompts.items():
        batch.add(
            NewRequestData(
                request_id, prompt, [], SamplingParams(), frozenset(), tables[request_id], 0
            )
        )
    plan = {"a": (8, 3), "b": (0, 7), "c": (1, 1)}  # computed, scheduled
    states = []
    for request_id, (computed, scheduled) in plan.items():
        state = batch.requests[request_id]
        state.num_computed_tokens, state.num_scheduled = computed, scheduled
        states.append(state)
    got = batch.forward_batch(states, torch.device("cpu"))
    want = ForwardBatch.build(
        [prompts[r][c : c + n] for r, (c, n) in plan.items()],
        [c for c, _ in plan.values()],
        [tables[r] for r in plan],
        4,
        torch.device("cpu"),
    )
    for name in (
        "input_ids",
        "positions",
        "slot_mapping",
        "block_tables",
        "seq_lens",
        "query_lens",
        "query_start_loc",
    ):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.max_seq_len, got.max_query_len) == (want.max_seq_len, want.max_query_len)
    batch.append_tokens(batch.requests["c"], [42, 43])
    assert batch.token_ids[batch.requests["c"].row, :4].tolist() == [40, 41, 42, 43]
