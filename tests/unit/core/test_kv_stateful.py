"""Randomized stateful test of the KV bookkeeping under preemption, eviction, forks and beams.

The real ``LLMEngine`` (scheduler, KV cache manager, output processor, beam search) runs over a
fake model runner that keeps a per-slot "KV store". Every scheduled token writes, through the
request's block table, a value that depends on the token, its position and the value the
previous position READ BACK from the store (as a real model's K/V depend on the whole prefix);
sampling hashes every value read back through the block table. So any wrong, stale, evicted or
shared-but-written block, or a bad copy-on-write, changes the outputs, which must equal each
request's solo run in a big pool. ``check_integrity`` runs after every step.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from kvforge.core import KVCacheManager, SchedulerOutput
from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.outputs import RequestOutput
from kvforge.runner import ModelRunnerOutput, TokenLogprobs
from kvforge.runner.input_batch import CachedRequestState, InputBatch
from kvforge.sampling_params import SamplingParams
from kvforge.tokenizer import Tokenizer

VOCAB = 24
EOS = 1
BLOCK_SIZE = 4
SOLO_BLOCKS = 256
_MASK = (1 << 61) - 1


def _mix(*values: int) -> int:
    """A deterministic 61-bit hash of a few integers."""
    acc = 0x2545F4914F6CDD1D
    for value in values:
        acc = ((acc ^ (value & _MASK)) * 0x100000001B3 + 0x9E3779B97F4A7C15) & _MASK
        acc ^= acc >> 29
    return acc


def make_tokenizer() -> Tokenizer:
    """A word-level tokenizer over ``t0 .. t{VOCAB-1}`` (the text is irrelevant here)."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[EOS], add_bos_token=False)


class FakeRunner:
    """A deterministic model whose outputs depend on every KV value it reads back.

    ``store[block][offset]`` is what was written at that slot. Writing position ``p`` stores
    ``mix(read(p - 1), token_p, p)``; sampling draws from logits seeded by a hash of every
    position read back through the request's block table.

    Like the real runner it knows requests only through the step contract (an InputBatch
    updated from each SchedulerOutput's diffs); with ``scheduler`` set it also checks that
    its copy matches the scheduler's requests (block tables, tokens, computed counts).
    """

    def __init__(self, num_blocks: int, tokenizer: Tokenizer) -> None:
        self.num_blocks = num_blocks
        self.tokenizer = tokenizer
        self.model_config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=4096)
        self.store: list[list[int | None]] = [[None] * BLOCK_SIZE for _ in range(num_blocks)]
        self.kv: KVCacheManager | None = None  # set by the test: checks writes are private
        self.scheduler: Any = None  # set by the test: checks the runner's copy
        self.num_copies = 0
        self.batch = InputBatch(BLOCK_SIZE, rows=2, tokens=8)

    def _read(self, table: list[int], position: int) -> int:
        value = self.store[table[position // BLOCK_SIZE]][position % BLOCK_SIZE]
        assert value is not None, f"read of an unwritten slot at position {position}"
        return value

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Apply block copies, write the scheduled tokens, sample the rows that reached the end."""
        for src, dst in output.blocks_to_copy:
            self.store[dst] = list(self.store[src])
            self.num_copies += 1
        result = ModelRunnerOutput()
        for request_id in output.finished_request_ids:
            self.batch.remove(request_id)
        for new in output.new_requests:
            self.batch.add(new)
        for cached in output.cached_requests:
            self.batch.update(cached)
        for request_id, num_new in output.num_scheduled_tokens.items():
            request = self.batch.requests[request_id]
            table = request.block_ids
            tokens = request.prompt_token_ids + request.output_token_ids
            start = request.num_computed_tokens
            if self.scheduler is not None:
                live = self.scheduler.requests[request_id]
                assert table == live.block_ids, f"{request_id}: stale block table"
                assert tokens == live.all_token_ids, f"{request_id}: stale tokens"
                assert start == live.num_computed_tokens, f"{request_id}: stale computed count"
            row = self.batch.token_ids[request.row, : len(tokens)].tolist()
            assert row == tokens, f"{request_id}: token row differs"
            assert len(table) >= -(-(start + num_new) // BLOCK_SIZE), "block table too short"
            for position in range(start, start + num_new):
                block = table[position // BLOCK_SIZE]
                if self.kv is not None:
                    # NOTE: a block is written only by its single owner and never once cached.
                    assert self.kv.pool.ref_cnt[block] == 1, f"write into shared block {block}"
                    assert not self.kv.prefix_cache.is_cached(block), f"write into cached {block}"
                previous = self._read(table, position - 1) if position else 0
                self.store[block][position % BLOCK_SIZE] = _mix(
                    previous, tokens[position], position
                )
            if start + num_new == request.num_tokens:
                self._sample(request, table, result)
        return result

    def _sample(
        self, request: CachedRequestState, table: list[int], result: ModelRunnerOutput
    ) -> None:
        digest = _mix(*(self._read(table, p) for p in range(request.num_tokens)))
        rng = random.Random(digest)
        logits = [rng.gauss(0.0, 2.0) for _ in range(VOCAB)]
        params = request.sampling_params
        if len(request.output_token_ids) < params.min_tokens and not params.ignore_eos:
            logits[EOS] = -math.inf
        top = max(logits)
        norm = top + math.log(sum(math.exp(x - top) for x in logits))
        logprobs = [x - norm for x in logits]
        if params.is_greedy:
            token = max(range(VOCAB), key=lambda t: logprobs[t])
        else:
            # Seeded sampling: reproducible from the seed and the sequence read back.
            weights = [math.exp(x / params.temperature) for x in logits]
            seeded = random.Random(_mix(params.seed or 0, digest))
            token = seeded.choices(range(VOCAB), weights)[0]
        result.add(request.request_id, [token], [logprobs[token]])
        self.batch.append_tokens(request, [token])
        if params.logprobs is not None:
            order = sorted(range(VOCAB), key=lambda t: -logprobs[t])
            top_k = [(t, logprobs[t]) for t in order[: params.logprobs]]
            rank = order.index(token) + 1
            result.logprobs[request.request_id] = [
                TokenLogprobs(token, logprobs[token], rank, top_k)
            ]


def make_fake_engine(
    num_blocks: int,
    *,
    policy: str = "fcfs",
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    long_prefill_token_threshold: int = 0,
    enable_prefix_caching: bool = True,
    enable_chunked_prefill: bool = True,
) -> LLMEngine:
    """An LLMEngine over a FakeRunner with ``num_blocks`` blocks of 4 tokens."""
    config = engine_config(
        "fake",
        block_size=BLOCK_SIZE,
        num_blocks=num_blocks,
        enable_prefix_caching=enable_prefix_caching,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
        long_prefill_token_threshold=long_prefill_token_threshold,
        scheduling_policy=policy,
        show_progress=False,
    )
    runner = FakeRunner(num_blocks, make_tokenizer())
    engine = LLMEngine(config, runner)  # type: ignore[arg-type]
    runner.kv = engine.kv_cache_manager
    runner.scheduler = engine.scheduler
    return engine


@dataclasses.dataclass(frozen=True)
class Submission:
    """One user request of a workload."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None


def _completions(output: RequestOutput) -> list[tuple[list[int], str | None]]:
    return [(list(c.token_ids), c.finish_reason) for c in output.outputs]


class SoloRuns:
    """Each submission run alone in a big pool (memoized): the expected outputs."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], list[tuple[list[int], str | None]]] = {}

    def __call__(self, sub: Submission) -> list[tuple[list[int], str | None]]:
        key = (sub.prompt, repr(sub.params), sub.cache_salt)
        if key not in self._cache:
            engine = make_fake_engine(SOLO_BLOCKS)
            engine.add_request(
                list(sub.prompt), sub.params, request_id="solo", cache_salt=sub.cache_salt
            )
            finished = drive(engine)
            self._cache[key] = _completions(finished["solo"])
        return self._cache[key]


def check_engine(engine: LLMEngine) -> None:
    """Every block accounted for, every request's blocks exactly its references."""
    engine.scheduler.check_integrity()


def drive(engine: LLMEngine, max_steps: int = 20_000) -> dict[str, RequestOutput]:
    """Step until idle, checking integrity after each step; final outputs by request id."""
    finished: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        check_engine(engine)
    raise AssertionError(f"no progress after {max_steps} steps")


def assert_no_leak(engine: LLMEngine) -> None:
    """All work done: every block free or evictable; a cache reset frees every block."""
    kv = engine.kv_cache_manager
    assert not engine.has_unfinished_requests()
    assert kv.pool.num_in_use == 0
    assert kv.num_available_blocks == kv.num_blocks
    kv.reset_prefix_cache()
    assert kv.pool.num_free_blocks == kv.num_blocks
    assert kv.prefix_cache.num_cached_blocks == 0
    kv.check_integrity()


# --------------------------------------------------------------------------- workloads
class Workload:
    """An engine under test with its submissions, aborts, finished outputs and event counts."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.submitted: dict[str, Submission] = {}
        self.aborted: set[str] = set()
        self.finished: dict[str, RequestOutput] = {}
        self.stats: Counter[str] = Counter()
        self._instrument()

    def _instrument(self) -> None:
        """Count the events the workload is meant to exercise (test-only wrappers)."""
        engine, stats = self.engine, self.stats
        cache = engine.kv_cache_manager.prefix_cache
        insert, evict = cache.insert, cache.evict
        preempt = engine.scheduler._preempt

        def counting_insert(parent: Any, key: tuple[int, ...], block_id: int) -> Any:
            node = insert(parent, key, block_id)
            stats["dedup"] += node.block_id != block_id
            return node

        def counting_evict(num_blocks: int) -> None:
            before = cache.num_evictable_blocks
            evict(num_blocks)
            stats["evicted"] += before - cache.num_evictable_blocks

        def counting_preempt(request: Any) -> None:
            stats["preempted"] += 1
            stats["preempted_held_beam"] += request.is_held
            stats["preempted_fork_parent"] += request.num_pending_forks > 0
            preempt(request)

        cache.insert = counting_insert  # type: ignore[method-assign]
        cache.evict = counting_evict  # type: ignore[method-assign]
        engine.scheduler._preempt = counting_preempt  # type: ignore[method-assign]

    def submit(self, sub: Submission) -> None:
        """Add a request to the engine."""
        self.engine.add_request(
            list(sub.prompt),
            sub.params,
            request_id=sub.request_id,
            priority=sub.priority,
            cache_salt=sub.cache_salt,
        )
        self.submitted[sub.request_id] = sub

    @property
    def live(self) -> list[str]:
        """Submitted request ids neither finished nor aborted."""
        return [r for r in self.submitted if r not in self.finished and r not in self.aborted]

    def abort(self, request_id: str) -> None:
        """Abort a live request and check the bookkeeping."""
        self.engine.abort_request(request_id)
        self.aborted.add(request_id)
        self.stats["aborted"] += 1
        check_engine(self.engine)

    def step(self) -> None:
        """One engine step, then the integrity check."""
        for output in self.engine.step():
            if output.finished:
                self.finished[output.request_id] = output
        check_engine(self.engine)
        self.stats["steps"] += 1

    def finish_and_verify(self, solo: SoloRuns) -> None:
        """Run to idle; every finished request equals its solo run; no block leaks."""
        for _ in range(50_000):
            if not self.engine.has_unfinished_requests():
                break
            self.step()
        assert not self.engine.has_unfinished_requests(), "no progress"
        stats = self.stats
        stats["preemptions"] += self.engine.num_preemptions
        stats["prefix_hit_tokens"] += self.engine.kv_cache_manager.prefix_cache.num_hits
        stats["copies"] += self.engine.runner.num_copies  # type: ignore[attr-defined]
        for request_id, sub in self.submitted.items():
            if request_id in self.aborted:
                continue
            output = self.finished[request_id]
            assert output.error is None, output.error
            assert _completions(output) == solo(sub), f"{request_id} differs from its solo run"
            stats["verified"] += 1
            stats["verified_beam"] += sub.params.use_beam_search
            stats["verified_fork"] += sub.params.num_samples > 1
        assert_no_leak(self.engine)


def random_submission(
    rng: random.Random, index: int, bases: list[list[int]], budget: int, max_prompt: int
) -> Submission:
    """A request over a shared base prompt (prefix cache hits), maybe n > 1 or beam search.

    ``budget`` bounds prompt + max_tokens so that every sequence fits the pool alone.
    """
    base = rng.choice(bases)
    suffix = [rng.randrange(2, VOCAB) for _ in range(rng.choice([0, 0, 1, 3, 6]))]
    prompt = (base + suffix)[:max_prompt]
    max_tokens = rng.randint(1, max(1, min(24, budget - len(prompt))))
    kind = rng.random()
    if kind < 0.15:
        params = SamplingParams(n=rng.choice([2, 3]), use_beam_search=True, max_tokens=max_tokens)
    elif kind < 0.4:
        n = rng.choice([2, 3])
        params = SamplingParams(
            n=n,
            best_of=rng.choice([None, n, n + 1]),
            temperature=1.0,
            seed=rng.randrange(1000),
            max_tokens=max_tokens,
            ignore_eos=rng.random() < 0.5,
        )
    else:
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=rng.random() < 0.7
        )
    salt = "salty" if rng.random() < 0.1 else None
    return Submission(f"r{index}", tuple(prompt), params, rng.randrange(3), salt)


def run_random_workload(seed: int, num_requests: int, solo: SoloRuns) -> Counter[str]:
    """Random arrivals and aborts on a tiny pool; finished outputs must equal solo runs.

    Returns the counts of the events it exercised.
    """
    rng = random.Random(seed)
    num_blocks = rng.randint(12, 40)
    chunked = rng.random() < 0.8
    max_num_batched_tokens = rng.choice([8, 16, 64] if chunked else [16, 32])
    workload = Workload(
        make_fake_engine(
            num_blocks,
            policy=rng.choice(["fcfs", "priority"]),
            max_num_seqs=rng.choice([2, 4, 8, 16]),
            max_num_batched_tokens=max_num_batched_tokens,
            long_prefill_token_threshold=rng.choice([0, 0, 5]),
            enable_prefix_caching=rng.random() < 0.9,
            enable_chunked_prefill=chunked,
        )
    )
    budget = min(num_blocks * BLOCK_SIZE // 2, 48)
    # Without chunked prefill a prompt must fit one step's token budget.
    max_prompt = budget - 4 if chunked else min(budget - 4, max_num_batched_tokens)
    bases = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(3)]
    pending = [random_submission(rng, i, bases, budget, max_prompt) for i in range(num_requests)]
    while pending:
        while pending and rng.random() < 0.4:
            workload.submit(pending.pop())
        live = workload.live
        if live and rng.random() < 0.03:
            workload.abort(rng.choice(live))
        workload.step()
    workload.finish_and_verify(solo)
    return workload.stats


@pytest.fixture(scope="module")
def solo() -> SoloRuns:
    """Solo runs shared by the tests of this module."""
    return SoloRuns()


def test_random_workloads_match_solo_runs(solo):
    totals: Counter[str] = Counter()
    for seed in range(40):
        totals += run_random_workload(seed, num_requests=30, solo=solo)
    # The workloads exercise what they are meant to (else this test could not fail).
    for event in (
        "preemptions",
        "preempted_held_beam",
        "preempted_fork_parent",
        "dedup",
        "evicted",
        "copies",
        "prefix_hit_tokens",
        "aborted",
        "verified_beam",
        "verified_fork",
    ):
        assert totals[event] > 0, f"no {event} in {dict(totals)}"


@pytest.mark.parametrize("max_num_batched_tokens", [2, 3])
def test_beams_sampled_in_different_steps_and_preempted_while_held(max_num_batched_tokens, solo):
    # A small token budget spreads the beams' tokens over several steps; a tiny pool preempts
    # a beam that already produced its token (held) and the group expands from it anyway.
    workload = Workload(make_fake_engine(9, max_num_batched_tokens=max_num_batched_tokens))
    beam = SamplingParams(n=3, use_beam_search=True, max_tokens=8)
    workload.submit(Submission("beam", tuple(range(2, 12)), beam))
    workload.submit(Submission("other", tuple(range(2, 10)), SamplingParams(max_tokens=8)))
    workload.finish_and_verify(solo)
    assert workload.stats["preempted_held_beam"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1200))
def test_random_workload_matches_solo_runs_long(seed, solo):
    run_random_workload(seed, num_requests=80, solo=solo)


# --------------------------------------------------------------------- hypothesis machine
_TOKENS = st.integers(2, VOCAB - 1)
_SOLO = SoloRuns()


class KVStateMachine(RuleBasedStateMachine):
    """Arrivals, steps and aborts in any order on a tiny pool (shrinks to a minimal failure)."""

    def __init__(self) -> None:
        super().__init__()
        self.workload: Workload | None = None
        self.bases: list[list[int]] = []
        self.budget = 0
        self.max_prompt = 0
        self.count = 0

    @initialize(
        num_blocks=st.integers(12, 40),
        policy=st.sampled_from(["fcfs", "priority"]),
        max_num_seqs=st.sampled_from([1, 2, 4, 16]),
        max_num_batched_tokens=st.sampled_from([4, 8, 16, 64]),
        threshold=st.sampled_from([0, 5]),
        caching=st.booleans(),
        chunked=st.booleans(),
        bases=st.lists(st.lists(_TOKENS, min_size=1, max_size=30), min_size=1, max_size=3),
    )
    def setup(
        self,
        num_blocks: int,
        policy: str,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        threshold: int,
        caching: bool,
        chunked: bool,
        bases: list[list[int]],
    ) -> None:
        """A fresh engine with its limits and the prompts its requests share."""
        engine = make_fake_engine(
            num_blocks,
            policy=policy,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            long_prefill_token_threshold=threshold,
            enable_prefix_caching=caching,
            enable_chunked_prefill=chunked,
        )
        self.workload = Workload(engine)
        self.bases = bases
        self.budget = min(num_blocks * BLOCK_SIZE // 2, 48)
        # Without chunked prefill a prompt must fit one step's token budget.
        self.max_prompt = (
            self.budget - 4 if chunked else min(self.budget - 4, max_num_batched_tokens)
        )

    @precondition(lambda self: self.workload is not None)
    @rule(
        base=st.integers(0, 2),
        suffix=st.lists(_TOKENS, max_size=6),
        max_tokens=st.integers(1, 24),
        kind=st.sampled_from(["greedy", "sample", "beam"]),
        n=st.integers(2, 3),
        extra=st.integers(0, 1),
        seed=st.integers(0, 999),
        ignore_eos=st.booleans(),
        priority=st.integers(0, 2),
        salted=st.booleans(),
    )
    def add(
        self,
        base: int,
        suffix: list[int],
        max_tokens: int,
        kind: str,
        n: int,
        extra: int,
        seed: int,
        ignore_eos: bool,
        priority: int,
        salted: bool,
    ) -> None:
        """A new request over one of the shared prompts."""
        assert self.workload is not None
        prompt = (self.bases[base % len(self.bases)] + suffix)[: self.max_prompt]
        max_tokens = max(1, min(max_tokens, self.budget - len(prompt)))
        if kind == "beam":
            params = SamplingParams(n=n, use_beam_search=True, max_tokens=max_tokens)
        elif kind == "sample":
            params = SamplingParams(
                n=n,
                best_of=n + extra,
                temperature=1.0,
                seed=seed,
                max_tokens=max_tokens,
                ignore_eos=ignore_eos,
            )
        else:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        self.count += 1
        salt = "salty" if salted else None
        self.workload.submit(Submission(f"h{self.count}", tuple(prompt), params, priority, salt))

    @precondition(lambda self: self.workload is not None)
    @rule(count=st.integers(1, 8))
    def step(self, count: int) -> None:
        """A few engine steps."""
        assert self.workload is not None
        for _ in range(count):
            if self.workload.engine.has_unfinished_requests():
                self.workload.step()

    @precondition(lambda self: self.workload is not None and bool(self.workload.live))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """Abort one live request."""
        assert self.workload is not None
        self.workload.abort(data.draw(st.sampled_from(self.workload.live)))

    @invariant()
    def integrity(self) -> None:
        """The bookkeeping holds between any two operations."""
        if self.workload is not None:
            check_engine(self.workload.engine)

    def teardown(self) -> None:
        """Finish everything: outputs equal solo runs, no block leaks."""
        if self.workload is not None:
            self.workload.finish_and_verify(_SOLO)


def _machine_settings(max_examples: int, steps: int, **kwargs: Any) -> settings:
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        **kwargs,
    )


def test_state_machine():
    run_state_machine_as_test(KVStateMachine, settings=_machine_settings(60, 40, derandomize=True))


@pytest.mark.slow
def test_state_machine_long():
    run_state_machine_as_test(KVStateMachine, settings=_machine_settings(400, 80))
