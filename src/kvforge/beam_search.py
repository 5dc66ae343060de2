"""Beam search over the paged engine: beams are Requests; expansion forks their KV blocks.

Each step every live beam proposes its ``2 * width`` most likely next tokens; all candidates
are ranked by length-penalized score and the best ``width`` survive. A survivor ending in EOS
is complete; the others become new Requests that share the parent's blocks (copy-on-write).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from kvforge.core.scheduler import Scheduler
from kvforge.core.step_io import ModelRunnerOutput, TokenLogprobs
from kvforge.request import Request, RequestStatus


def beam_score(num_tokens: int, cumulative_logprob: float, length_penalty: float) -> float:
    """Cumulative logprob divided by generated length ** length_penalty."""
    return cumulative_logprob / (max(num_tokens, 1) ** length_penalty)


@dataclass
class Beam:
    """A finished or candidate beam."""

    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str

    def score(self, length_penalty: float, eos_ids: frozenset[int]) -> float:
        """Length-penalized score; a final EOS does not count toward the length."""
        length = len(self.token_ids) - (
            1 if self.token_ids and self.token_ids[-1] in eos_ids else 0
        )
        return beam_score(length, self.cumulative_logprob, length_penalty)


@dataclass
class BeamSearchGroup:
    """The live beams and completed hypotheses of one beam-search request."""

    request_id: str
    width: int
    max_tokens: int
    length_penalty: float
    eos_token_ids: frozenset[int]
    live: list[Request]
    completed: list[Beam] = field(default_factory=list)
    _counter: itertools.count = field(default_factory=itertools.count)
    # Live beam id -> logprobs of the token it produced. Beams may produce theirs in different
    # steps (token budget, preemption), so each is kept until the group expands.
    _entries: dict[str, TokenLogprobs] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True when no beam is left to extend."""
        return not self.live

    def step(self, scheduler: Scheduler, runner_output: ModelRunnerOutput) -> None:
        """Hold beams that produced a token; expand once all of them have."""
        for beam in self.live:
            entries = runner_output.logprobs.get(beam.request_id)
            if entries:
                entry = entries[-1]
                # NOTE: a held beam is never scheduled again (a preempted one is not
                # readmitted), so this is its only token until the expansion below.
                beam.is_held = True
                self._entries[beam.request_id] = entry
        if not all(beam.is_held for beam in self.live):
            return
        chosen, self._entries = self._entries, {}
        candidates: list[tuple[float, Request, int, float]] = []
        for beam in self.live:
            entry = chosen[beam.request_id]
            base = beam.cumulative_logprob - entry.logprob  # undo the greedy token's logprob
            for token_id, logprob in entry.top[: 2 * self.width]:
                tokens = [*beam.output_token_ids[:-1], token_id]
                beam_ = Beam(tokens, base + logprob, "stop")
                candidates.append(
                    (
                        beam_.score(self.length_penalty, self.eos_token_ids),
                        beam,
                        token_id,
                        base + logprob,
                    )
                )
        candidates.sort(key=lambda c: -c[0])
        survivors = candidates[: self.width]
        new_live: list[Request] = []
        for _, parent, token_id, cumulative in survivors:
            tokens = [*parent.output_token_ids[:-1], token_id]
            if token_id in self.eos_token_ids:
                self.completed.append(Beam(tokens, cumulative, "stop"))
            elif len(tokens) >= self.max_tokens or parent.is_finished:
                self.completed.append(Beam(tokens, cumulative, "length"))
            else:
                new_live.append(self._fork(scheduler, parent, tokens, cumulative))
        for beam in self.live:
            scheduler.finish(beam, RequestStatus.FINISHED_ABORTED)
        self.live = new_live

    def _fork(
        self, scheduler: Scheduler, parent: Request, tokens: list[int], cumulative: float
    ) -> Request:
        child = Request(
            request_id=f"{self.request_id}#beam{next(self._counter)}",
            prompt_token_ids=parent.prompt_token_ids,
            sampling_params=parent.sampling_params,
            eos_token_ids=parent.eos_token_ids,
            arrival_time=parent.arrival_time,
            priority=parent.priority,
            cache_salt=parent.cache_salt,
            lora_id=parent.lora_id,
            max_tokens=parent.max_tokens,
            output_token_ids=tokens,
            cumulative_logprob=cumulative,
            num_cached_tokens=parent.num_cached_tokens,
            first_token_time=parent.first_token_time,
        )
        scheduler.fork_running(parent, child)
        return child

    def best(self) -> list[Beam]:
        """The ``width`` best completed beams, best first."""
        ranked = sorted(
            self.completed, key=lambda b: -b.score(self.length_penalty, self.eos_token_ids)
        )
        return ranked[: self.width]
