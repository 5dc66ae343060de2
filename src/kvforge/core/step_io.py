"""What crosses between the scheduler and the model runner each step: plain, picklable data.

The scheduler owns every request's state; the runner keeps its own copy of what it needs to
run them (token ids, block tables, sampling parameters) and learns about changes only from
a :class:`SchedulerOutput`:

- a request it has not seen, or sees again after preemption, comes whole
  (:class:`NewRequestData`);
- a request it already holds comes as a small diff (:class:`CachedRequestData`): its
  computed-token count, blocks appended to its table and table entries replaced (copy on
  write, or a block another request cached first);
- ``finished_request_ids`` tells it what to forget.

The runner appends the tokens it samples to its own copy, and returns them per request as a
list (``sampled_token_ids``: one token normally, up to k+1 when it verifies k draft tokens);
the scheduler appends them to the request, checks stops, and (later) rolls back rejected
drafts. Nothing here imports torch, so a worker on another rank can rebuild a step from a
pickled SchedulerOutput alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvforge.multimodal import ImageInput
from kvforge.outputs import RequestFailure
from kvforge.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request sent whole: first scheduled, or resumed after preemption."""

    request_id: str
    prompt_token_ids: list[int]
    # Generated so far (non-empty when resumed after preemption, or a forked beam).
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int
    lora_id: int = 0
    mm_inputs: list[ImageInput] = field(default_factory=list)


@dataclass(slots=True)
class CachedRequestData:
    """What changed for a request the runner already holds."""

    request_id: str
    num_computed_tokens: int
    new_block_ids: list[int] = field(default_factory=list)
    # (index in the block table, new block id): copy on write, or adoption of a cached block
    replaced_block_ids: list[tuple[int, int]] = field(default_factory=list)
    # Entries of the runner's table that stay before new_block_ids are appended (fewer than
    # it holds when rejected draft tokens freed trailing blocks); -1: all of them.
    num_kept_blocks: int = -1


@dataclass(slots=True)
class SchedulerOutput:
    """One step: which requests run how many tokens, plus KV block copies and finishes."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # request id -> tokens to run this step, in batch order
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # since the last step
    # Draft tokens to verify per request (speculative decoding; empty otherwise).
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Drafts a draft model should propose at the end of this step, per request that samples
    # (the scheduler takes them in the next step).
    draft_lengths: dict[str, int] = field(default_factory=dict)
    # Allowed-token bits of the structured-output requests that sample this step: an int32
    # tensor [len(grammar_request_ids), ceil(V / 32)] built by the grammar backend. A request
    # with k drafts has k + 1 consecutive rows (its id repeated): the bits after each draft.
    grammar_request_ids: list[str] = field(default_factory=list)
    grammar_bitmask: Any = None

    @property
    def num_batched_tokens(self) -> int:
        """Tokens run this step over all requests."""
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        """True when nothing is scheduled."""
        return not self.num_scheduled_tokens


class TokenLogprobs(NamedTuple):
    """Logprob of one chosen token, its rank, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(slots=True)
class ModelRunnerOutput:
    """The runner's answer to one SchedulerOutput.

    ``sampled_token_ids[i]`` / ``sampled_logprobs[i]`` belong to ``request_ids[i]`` (the
    requests that reached their last known token this step).
    """

    request_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    sampled_logprobs: list[list[float]] = field(default_factory=list)
    # request id -> top logprobs of each sampled token (only when the request asks for them)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # request id -> (position of the first entry's context end, entries for following tokens)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # request id -> why it failed (that request fails; the rest of the batch goes on)
    failed: dict[str, RequestFailure] = field(default_factory=dict)
    # request id -> draft tokens for its next step (see SchedulerOutput.draft_lengths)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)

    def add(self, request_id: str, token_ids: list[int], logprobs: list[float]) -> None:
        """Record a request's sampled tokens."""
        self.request_ids.append(request_id)
        self.sampled_token_ids.append(token_ids)
        self.sampled_logprobs.append(logprobs)

    def tokens_of(self, request_id: str) -> list[int]:
        """Sampled tokens of one request ([] if it sampled none); linear, for tests."""
        for index, rid in enumerate(self.request_ids):
            if rid == request_id:
                return self.sampled_token_ids[index]
        return []
