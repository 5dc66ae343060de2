"""Request: every piece of per-request state, plain Python. The runner never mutates it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kvforge.multimodal import ImageInput, cache_key_ids
from kvforge.outputs import RequestFailure
from kvforge.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. Values above ``PREEMPTED`` are finished states."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        """True for any FINISHED_* status."""
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI finish reason of a finished status."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True, eq=False)  # identity equality: queues hold and remove exact objects
class Request:
    """One sequence being generated. ``n > 1`` requests become ``n`` Requests sharing a prompt.

    ``num_computed_tokens`` counts tokens whose KV is in the cache; the tokens from there to
    ``num_tokens`` are what the scheduler still has to run.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    cache_salt: str | None = None
    lora_id: int = 0
    max_tokens: int = 16
    # The request whose prompt KV this one forks from once it is computed (n > 1 samples).
    fork_parent: Request | None = None
    num_pending_forks: int = 0
    # Grammar matcher of a structured-output request (advanced by the scheduler's update).
    grammar: Any = None
    # Held requests are not scheduled (a beam waiting for its siblings before expansion).
    is_held: bool = False
    # Images of a vision chat prompt (placeholder spans, content hashes, embeddings).
    mm_inputs: list[ImageInput] = field(default_factory=list)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    # Why the request failed inside the engine (set with a FINISHED_ABORTED status).
    error: RequestFailure | None = None
    # What the runner holds: blocks of the table it was sent (-1: send the request whole),
    # and indices of entries replaced since (copy on write, adopting a cached block).
    num_blocks_sent: int = -1
    replaced_blocks: list[int] = field(default_factory=list)
    # Speculative decoding: the proposer's per-request state, the draft length it may use now
    # (adapted to how many drafts were accepted), drafts proposed and accepted so far.
    spec_state: Any = None
    # Drafts a draft model proposed at the end of the last step, valid while the request
    # still has spec_base tokens.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_base: int = -1
    spec_k: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        """True once the request reached a FINISHED_* status."""
        return self.status.is_finished

    @property
    def cache_key_ids(self) -> list[int]:
        """What the prefix cache keys the request's tokens by: its token ids, with image
        placeholders replaced by ids of the image's content (a new list)."""
        return cache_key_ids(self.all_token_ids, self.mm_inputs)

    @property
    def is_prefill_done(self) -> bool:
        """True once every prompt token has its KV computed."""
        return self.num_computed_tokens >= self.num_prompt_tokens
