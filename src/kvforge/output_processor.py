"""OutputProcessor: detokenizes, applies stop strings, gathers logprobs, builds RequestOutputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kvforge.core.step_io import ModelRunnerOutput, TokenLogprobs
from kvforge.outputs import (
    CompletionOutput,
    Logprob,
    RequestFailure,
    RequestMetrics,
    RequestOutput,
)
from kvforge.request import Request, RequestStatus
from kvforge.sampling_params import SamplingParams
from kvforge.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class SequenceState:
    """Output state of one generated sequence (one child Request)."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_seen: int = 0  # output tokens given to the detokenizer


@dataclass
class RequestState:
    """Output state of one user request: its prompt and its ``n`` (or ``best_of``) sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    sequences: list[SequenceState] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        """All sequences finished."""
        return all(s.finish_reason is not None for s in self.sequences)


class OutputProcessor:
    """Turns scheduler/runner results into RequestOutputs; reports stop-string finishes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._by_child: dict[str, tuple[RequestState, SequenceState]] = {}

    def add(self, state: RequestState, children: list[Request]) -> None:
        """Track a new request and its child sequences."""
        params = state.params
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        for index, child in enumerate(children):
            detok = IncrementalDetokenizer(
                self.tokenizer,
                state.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop_list,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            seq = SequenceState(child, index, detok, [] if params.logprobs is not None else None)
            state.sequences.append(seq)
            self._by_child[child.request_id] = (state, seq)
        self.states[state.request_id] = state

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        text = self.tokenizer.decode
        out = {entry.token_id: Logprob(entry.logprob, entry.rank, text([entry.token_id], False))}
        for rank, (token_id, logprob) in enumerate(entry.top, start=1):
            if token_id not in out:
                out[token_id] = Logprob(logprob, rank, text([token_id], False))
        return out

    def process(
        self, changed: list[Request], runner_output: ModelRunnerOutput
    ) -> tuple[list[RequestOutput], list[str], dict[str, RequestFailure]]:
        """Outputs of the requests touched this step, child ids stopped by a stop string, and
        child ids that failed here (or in the scheduler) with the reason."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        failed: dict[str, RequestFailure] = {}
        for child_id, (first_pos, entries) in runner_output.prompt_logprobs.items():
            found = self._by_child.get(child_id)
            if found is None:
                continue
            state = found[0]
            assert state.prompt_logprobs is not None
            for offset, entry in enumerate(entries):
                # Entry k scores prompt token first_pos + k + 1; a recompute repeats old ones.
                if first_pos + offset + 1 == len(state.prompt_logprobs):
                    state.prompt_logprobs.append(self._logprob_dict(entry))
        for request in changed:
            found = self._by_child.get(request.request_id)
            if found is None:
                continue
            if request.error is not None:
                failed[request.request_id] = request.error
                continue
            try:
                self._advance(request, *found, runner_output, stopped)
            except Exception as exc:  # noqa: BLE001 - fails this request only
                logger.error("output processing failed for %s", request.request_id, exc_info=exc)
                failed[request.request_id] = RequestFailure(f"{type(exc).__name__}: {exc}")
                continue
            touched[found[0].request_id] = found[0]
        outputs = [
            self._make_output(s)
            for s in touched.values()
            if self._should_emit(s) and s.request_id in self.states
        ]
        return outputs, stopped, failed

    def _advance(
        self,
        request: Request,
        state: RequestState,
        seq: SequenceState,
        runner_output: ModelRunnerOutput,
        stopped: list[str],
    ) -> None:
        entries = runner_output.logprobs.get(request.request_id, [])
        new_tokens = request.output_token_ids[seq.num_seen :]
        for index, token_id in enumerate(new_tokens):
            seq.num_seen += 1
            hit_stop = seq.detokenizer.add_token(token_id)
            if seq.logprobs is not None and index < len(entries):
                seq.logprobs.append(self._logprob_dict(entries[index]))
            if hit_stop and not request.is_finished:
                # A stop string ends the sequence here: later tokens of this step are dropped
                # and the engine finishes the request in the scheduler.
                del request.output_token_ids[seq.num_seen :]
                stopped.append(request.request_id)
                seq.finish_reason, seq.stop_reason = "stop", seq.detokenizer.stop_reason
                return
        if request.is_finished:
            seq.finish_reason = request.status.finish_reason
            seq.stop_reason = request.stop_reason

    def fail(self, child_id: str, error: RequestFailure) -> tuple[RequestOutput, list[str]] | None:
        """Finish the request owning ``child_id`` with ``error``; returns its final output and
        every child id (for the scheduler to free), or None if the request is gone."""
        found = self._by_child.get(child_id)
        if found is None:
            return None
        state = found[0]
        children = self.abort(state.request_id)
        output = RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[],
            finished=True,
            error=error.message,
            error_status=error.status,
        )
        return output, children

    def _should_emit(self, state: RequestState) -> bool:
        # best_of keeps only the n best sequences, known once all are finished.
        hides_partial = state.params.num_samples > state.params.n
        return state.finished or not hides_partial

    def _make_output(self, state: RequestState) -> RequestOutput:
        sequences = state.sequences
        if state.finished and state.params.num_samples > state.params.n:
            sequences = sorted(sequences, key=lambda s: -s.request.cumulative_logprob)[
                : state.params.n
            ]
        outputs = [
            CompletionOutput(
                index=i if len(sequences) != len(state.sequences) else seq.index,
                text=seq.detokenizer.final_text
                if seq.finish_reason
                else seq.detokenizer.output_text,
                token_ids=list(seq.request.output_token_ids),
                cumulative_logprob=seq.request.cumulative_logprob,
                logprobs=seq.logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for i, seq in enumerate(sequences)
        ]
        first = state.sequences[0].request
        now = time.monotonic()
        metrics = RequestMetrics(
            arrival_time=state.arrival_time,
            num_prompt_tokens=len(state.prompt_token_ids),
            num_cached_tokens=first.num_cached_tokens,
            num_generation_tokens=sum(len(s.request.output_token_ids) for s in state.sequences),
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=min(
                (s.request.first_token_time for s in state.sequences if s.request.first_token_time),
                default=None,
            ),
            finished_time=now if state.finished else None,
            num_draft_tokens=sum(s.request.num_draft_tokens for s in state.sequences),
            num_accepted_tokens=sum(s.request.num_accepted_tokens for s in state.sequences),
        )
        if state.finished:
            self._forget(state)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=state.finished,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=first.num_cached_tokens,
            metrics=metrics,
        )

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its child ids for the scheduler to abort."""
        state = self.states.get(request_id)
        if state is None:
            return []
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = RequestStatus.FINISHED_ABORTED.finish_reason
        self._forget(state)
        return [seq.request.request_id for seq in state.sequences]

    def _forget(self, state: RequestState) -> None:
        self.states.pop(state.request_id, None)
        for seq in state.sequences:
            self._by_child.pop(seq.request.request_id, None)
