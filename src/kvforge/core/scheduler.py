"""Scheduler: continuous batching with chunked prefill, priorities and preemption.

The only unit of work is "N tokens for this request": a prompt chunk, a whole prompt, a
decode token and (later) speculative tokens are all the same thing. Each step spends one
token budget, running requests first, then admits waiting ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from kvforge.config import SchedulerConfig, SpeculativeConfig
from kvforge.core.kv_cache_manager import KVCacheManager
from kvforge.core.step_io import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from kvforge.multimodal import whole_images
from kvforge.outputs import RequestFailure
from kvforge.request import Request, RequestStatus
from kvforge.spec_decode import NgramProposer, SpecDecodeStats
from kvforge.utils import cdiv

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the waiting and running queues and decides each step's batch."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        max_model_len: int,
        vocab_size: int = 0,
        speculative: SpeculativeConfig | None = None,
        max_loras: int = 0,
    ) -> None:
        self.config = config
        # Distinct LoRA adapters allowed among running requests (the model's slots; 0: no LoRA).
        self.max_loras = max_loras
        self.kv = kv_cache_manager
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size  # for grammar bitmasks
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        self.spec = speculative or SpeculativeConfig()
        self.proposer = (
            NgramProposer(self.spec.ngram_prompt_lookup_min, self.spec.ngram_prompt_lookup_max)
            if self.spec.method == "ngram"
            else None
        )
        self.spec_stats = SpecDecodeStats(self.spec.num_speculative_tokens)
        self._speculate = False  # this step's batch may take drafts

    # ----------------------------------------------------------------- queues
    def add_request(self, request: Request) -> None:
        """Queue a new request."""
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.running)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.waiting or self.running)

    def _priority_key(self, request: Request) -> tuple[float, float]:
        if self.config.policy == "priority":
            return (request.priority, request.arrival_time)
        return (0, request.arrival_time)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts; allocate their KV slots."""
        output: list[tuple[Request, int]] = []
        budget = self.config.max_num_batched_tokens
        self._fork_ready_children()
        preempted = False
        scheduled_ids: set[str] = set()
        drafts: dict[str, list[int]] = {}
        speculate = self.spec.enabled and (
            not self.spec.disable_by_batch_size
            or len(self.running) <= self.spec.disable_by_batch_size
        )
        self._speculate = speculate
        for request in list(self.running):
            if budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                continue
            proposal = self._propose(request, budget - num_new) if speculate else []
            while not self.kv.allocate_slots(request, num_new + len(proposal)):
                if proposal:  # no room for the drafts: decode one token as usual
                    proposal = []
                    continue
                victim = self._pick_victim(exclude=scheduled_ids, requester=request)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                output.append((request, num_new + len(proposal)))
                scheduled_ids.add(request.request_id)
                budget -= num_new + len(proposal)
                if proposal:
                    drafts[request.request_id] = proposal
        if not preempted:
            budget = self._admit_waiting(output, budget)
            if not output:
                budget = self._preempt_held_for_waiting(output, budget)
        return self._make_output(output, drafts)

    @staticmethod
    def _can_speculate(request: Request) -> bool:
        """False for requests that take no drafts: beams, and those that opted out."""
        params = request.sampling_params
        return params.speculative and not (request.is_held or params.use_beam_search)

    def _propose(self, request: Request, room: int) -> list[int]:
        """Draft tokens for a decoding request (``[]`` where speculation cannot apply)."""
        if request.num_computed_tokens != request.num_tokens - 1 or not self._can_speculate(
            request
        ):
            return []
        k = min(
            request.spec_k or self.spec.num_speculative_tokens,
            room,
            # the step keeps at most k + 1 tokens: no drafts past max_tokens or the context
            request.max_tokens - len(request.output_token_ids) - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        if k <= 0:
            return []
        if self.proposer is not None:
            proposal = self.proposer.propose(request, k)
        elif request.spec_base == request.num_tokens:
            # A draft model proposed at the end of the last step, for the tokens it had.
            proposal = request.spec_token_ids[:k]
        else:
            return []
        return self._grammar_prefix(request, proposal) if request.grammar else proposal

    @staticmethod
    def _grammar_prefix(request: Request, proposal: list[int]) -> list[int]:
        """The drafts the request's grammar allows, up to the first it rejects or its end."""
        grammar = request.grammar
        accepted = kept = 0
        try:
            for token_id in proposal:
                if not grammar.accept_token(token_id):
                    break
                accepted += 1
                if grammar.is_terminated():  # the end is the target's to choose
                    break
                kept = accepted
        finally:
            if accepted:
                grammar.rollback(accepted)
        return proposal[:kept]

    def _make_output(
        self, scheduled: list[tuple[Request, int]], drafts: dict[str, list[int]] | None = None
    ) -> SchedulerOutput:
        """The step as plain data: new requests whole, running ones as diffs."""
        output = SchedulerOutput(blocks_to_copy=self.kv.take_copies(), draft_token_ids=drafts or {})
        output.finished_request_ids, self._finished_ids = self._finished_ids, []
        now = time.monotonic()
        sampling: list[Request] = []
        for request, num_new in scheduled:
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            output.num_scheduled_tokens[request.request_id] = num_new
            sent = request.num_blocks_sent
            if sent < 0:
                output.new_requests.append(
                    NewRequestData(
                        request.request_id,
                        request.prompt_token_ids,
                        list(request.output_token_ids),
                        request.sampling_params,
                        request.eos_token_ids,
                        list(request.block_ids),
                        request.num_computed_tokens,
                        request.lora_id,
                        request.mm_inputs,
                    )
                )
            else:
                output.cached_requests.append(
                    CachedRequestData(
                        request.request_id,
                        request.num_computed_tokens,
                        request.block_ids[sent:],
                        [(i, request.block_ids[i]) for i in request.replaced_blocks if i < sent],
                        sent,
                    )
                )
            request.num_blocks_sent = len(request.block_ids)
            request.replaced_blocks.clear()
            drafted = len(output.draft_token_ids.get(request.request_id, ()))
            if request.grammar is not None and (
                request.num_computed_tokens + num_new == request.num_tokens + drafted
            ):
                sampling.append(request)
            if self.proposer is None and self._speculate:
                self._ask_for_drafts(output, request, num_new)
        if sampling:
            self._fill_bitmask(output, sampling)
        return output

    def _ask_for_drafts(self, output: SchedulerOutput, request: Request, num_new: int) -> None:
        """Have the draft model propose for ``request`` at the end of the step, if it samples
        then and may take drafts."""
        drafts = output.draft_token_ids.get(request.request_id, ())
        samples = request.num_computed_tokens + num_new == request.num_tokens + len(drafts)
        if samples and self._can_speculate(request) and request.num_pending_forks == 0:
            output.draft_lengths[request.request_id] = (
                request.spec_k or self.spec.num_speculative_tokens
            )

    def _fill_bitmask(self, output: SchedulerOutput, requests: list[Request]) -> None:
        """Allowed next tokens of the structured-output requests that sample this step."""
        from kvforge.structured.backend import new_bitmask  # torch, only when needed

        drafts = [output.draft_token_ids.get(r.request_id, []) for r in requests]
        bitmask = new_bitmask(sum(len(d) + 1 for d in drafts), self.vocab_size)
        row = 0
        for request, draft in zip(requests, drafts):
            grammar = request.grammar
            accepted = 0
            try:
                # One row per position: the bits before each draft and after the last one.
                for j in range(len(draft) + 1):
                    grammar.fill_bitmask(bitmask, row + j)
                    if j < len(draft):
                        if not grammar.accept_token(draft[j]):
                            raise RuntimeError(f"draft token {draft[j]} was checked but rejected")
                        accepted += 1
            except Exception as exc:  # noqa: BLE001 - one request's grammar fails, not the engine
                logger.error("grammar of %s failed", request.request_id, exc_info=exc)
                request.error = RequestFailure(f"grammar failed: {type(exc).__name__}: {exc}")
            finally:
                if accepted:
                    grammar.rollback(accepted)
            row += len(draft) + 1
        output.grammar_request_ids = [
            r.request_id for r, d in zip(requests, drafts) for _ in range(len(d) + 1)
        ]
        output.grammar_bitmask = bitmask

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        if request.is_held:
            return 0
        limit = request.num_tokens
        if request.num_pending_forks:
            # Stop one short of the prompt: each forked sample computes the last token itself.
            limit = min(limit, request.num_prompt_tokens - 1)
        num_new = min(limit - request.num_computed_tokens, budget)
        threshold = self.config.long_prefill_token_threshold
        if threshold:
            num_new = min(num_new, threshold)
        if request.mm_inputs and num_new > 0:
            num_new = whole_images(request.mm_inputs, request.num_computed_tokens, num_new)
        return max(num_new, 0)

    def _admit_waiting(self, output: list[tuple[Request, int]], budget: int) -> int:
        skipped: list[Request] = []
        # NOTE: held beams (waiting for their group's expansion) take no slot of the batch; if
        # they did, a preempted sibling could never come back and the group would never expand.
        num_held = sum(1 for r in self.running if r.is_held)
        while (
            self.waiting and budget > 0 and len(self.running) - num_held < self.config.max_num_seqs
        ):
            request = min(self.waiting, key=self._priority_key)
            # A fork starts when its parent's prompt is computed; a held beam that was
            # preempted waits for its group's expansion (its sampled token is already known).
            if request.fork_parent is not None or request.is_held or self._no_lora_slot(request):
                self.waiting.remove(request)
                skipped.append(request)
                continue
            computed = (
                self.kv.get_computed_blocks(request) if request.num_computed_tokens == 0 else []
            )
            num_computed = len(computed) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            if request.num_pending_forks:  # a fork parent stops one short of its prompt
                num_new = min(num_new, request.num_prompt_tokens - 1 - num_computed)
            # NOTE: without chunked prefill a request waits for a step with budget for all its
            # tokens; only a recompute after preemption longer than any step's budget (prompt
            # plus outputs) is chunked anyway, or it could never run again.
            if self.config.enable_chunked_prefill or num_new > self.config.max_num_batched_tokens:
                num_new = min(num_new, budget)
                if self.config.long_prefill_token_threshold:
                    num_new = min(num_new, self.config.long_prefill_token_threshold)
                if request.mm_inputs:  # an image's placeholders run in one chunk
                    num_new = whole_images(request.mm_inputs, num_computed, num_new)
            elif num_new > budget:
                break
            if not self.kv.allocate_slots(request, num_new, computed):
                break
            self.waiting.remove(request)
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if num_new > 0:
                output.append((request, num_new))
                budget -= num_new
        self.waiting[:0] = skipped
        return budget

    def _no_lora_slot(self, request: Request) -> bool:
        """True when admitting ``request`` would put more adapters in the batch than slots."""
        if not request.lora_id:
            return False
        adapters = {r.lora_id for r in self.running} - {0}
        return request.lora_id not in adapters and len(adapters) >= self.max_loras

    def _fork_ready_children(self) -> None:
        for child in [r for r in self.waiting if r.fork_parent is not None]:
            parent = child.fork_parent
            assert parent is not None
            if parent.is_finished:  # parent gone before forking: compute the prompt alone
                child.fork_parent = None
                continue
            ready = (
                parent.status == RequestStatus.RUNNING
                and parent.num_computed_tokens >= parent.num_prompt_tokens - 1
            )
            if not ready:
                continue
            parent.num_pending_forks -= 1
            child.fork_parent = None
            if len(self.running) >= self.config.max_num_seqs:
                # No room to fork now. The parent must not wait for a slot (every slot could
                # be held by parents waiting for their forks): the child computes the prompt
                # itself once admitted, from the parent's full blocks in the prefix cache.
                continue
            self.kv.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RequestStatus.RUNNING
            self.waiting.remove(child)
            self.running.append(child)

    def fork_running(self, parent: Request, child: Request) -> None:
        """Start ``child`` as a running copy of ``parent``'s KV (beam search)."""
        self.requests[child.request_id] = child
        self.kv.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def _preempt_held_for_waiting(self, output: list[tuple[Request, int]], budget: int) -> int:
        """Nothing could run: free held beams' blocks until a waiting request is admitted.

        Held beams only keep KV for their group's expansion. When they fill the cache while
        their preempted siblings wait for blocks, no group could ever expand; preempting them
        is safe (their sampled tokens are known; expansion forks them and recomputes).
        """
        while not output and any(not r.is_held for r in self.waiting):
            held = {r.request_id for r in self.running if r.is_held}
            if not held:
                break
            active = {r.request_id for r in self.running} - held
            self._preempt(self._pick_victim(exclude=active))
            budget = self._admit_waiting(output, budget)
        return budget

    def _pick_victim(self, exclude: set[str], requester: Request | None = None) -> Request:
        # NOTE: the request being scheduled is never in ``exclude``, so this is never empty.
        candidates = [r for r in self.running if r.request_id not in exclude]
        victim = self._last_in_policy(candidates)
        held = [r for r in candidates if r.is_held]
        if victim is requester and held:
            # Rather than give up on the requester (maybe the beam the held ones wait for:
            # preempting itself forever while they keep the blocks), preempt an idle held beam.
            victim = self._last_in_policy(held)
        return victim

    def _last_in_policy(self, candidates: list[Request]) -> Request:
        if self.config.policy == "priority":
            return max(candidates, key=self._priority_key)
        return candidates[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_blocks_sent = -1  # the runner gets it whole when it resumes
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, request)
        logger.warning(
            "preempted request %s (recompute %d tokens); total preemptions %d: the KV cache "
            "is too small for the load",
            request.request_id,
            request.num_tokens,
            self.num_preemptions,
        )

    # ----------------------------------------------------------------- update
    def update(self, output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish stopped requests.

        Returns the requests that produced tokens or finished this step.
        """
        changed: list[Request] = []
        now = time.monotonic()
        sampled = {request_id: index for index, request_id in enumerate(runner_output.request_ids)}
        for request_id, num_new in output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            index = sampled.get(request_id)
            drafts = output.draft_token_ids.get(request_id)
            token_ids = runner_output.sampled_token_ids[index] if index is not None else []
            if drafts:
                # The runner returns the accepted drafts plus one token of its own; the KV
                # written for the rejected drafts is discarded below (trim).
                accepted = max(len(token_ids) - 1, 0)
                num_new -= len(drafts) - accepted
                self._record_drafts(request, len(drafts), accepted)
            request.num_computed_tokens += num_new
            if not drafts:
                self.kv.cache_blocks(request)
            if request.error is not None:  # its grammar failed while building the bitmask
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                changed.append(request)
                continue
            if index is None:
                continue
            logprobs = runner_output.sampled_logprobs[index]
            status = None
            for token_id, logprob in zip(token_ids, logprobs):
                request.output_token_ids.append(token_id)
                request.cumulative_logprob += logprob
                status = self._advance_grammar(request, token_id)
                status = status or self._check_stop(request, token_id)
                if status is not None:
                    break
            if drafts:
                # A stop among the accepted tokens drops the rest: their KV is not the
                # request's. Cache only now that the accepted tokens are in the request.
                request.num_computed_tokens = min(
                    request.num_computed_tokens, request.num_tokens - 1
                )
                self.kv.trim(request)
                self.kv.cache_blocks(request)
            proposed = runner_output.draft_token_ids.get(request_id)
            if proposed is not None and status is None:
                request.spec_token_ids, request.spec_base = proposed, request.num_tokens
            if status is not None:
                self.finish(request, status)
            if request.first_token_time is None:
                request.first_token_time = now
            changed.append(request)
        return changed

    def _record_drafts(self, request: Request, proposed: int, accepted: int) -> None:
        """Count a verification and adapt the request's draft length: one more after all
        drafts were accepted, else what was accepted plus one."""
        request.num_draft_tokens += proposed
        request.num_accepted_tokens += accepted
        self.spec_stats.record(proposed, accepted)
        limit = self.spec.num_speculative_tokens
        request.spec_k = min(limit, proposed + 1) if accepted == proposed else accepted + 1

    @staticmethod
    def _advance_grammar(request: Request, token_id: int) -> RequestStatus | None:
        if request.grammar is None:
            return None
        try:
            accepted = request.grammar.accept_token(token_id)
            terminated = accepted and request.grammar.is_terminated()
        except Exception as exc:  # noqa: BLE001 - one request's grammar fails, not the engine
            request.error = RequestFailure(f"grammar failed: {type(exc).__name__}: {exc}")
            return RequestStatus.FINISHED_ABORTED
        if not accepted:
            # The sampler only offers allowed tokens; a rejection means a bug, not user error.
            request.error = RequestFailure(f"grammar rejected token {token_id}")
            return RequestStatus.FINISHED_ABORTED
        return RequestStatus.FINISHED_STOPPED if terminated else None

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if num_output >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish a request (stop, length or abort) and free its blocks."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        for child in self.waiting:
            if child.fork_parent is request:
                child.fork_parent = None
        self.requests.pop(request.request_id, None)
        self._finished_ids.append(request.request_id)

    def check_integrity(self) -> None:
        """Assert the KV bookkeeping between steps: blocks accounted for (free, cached or
        referenced by exactly the requests holding them), running requests holding the blocks
        of their computed tokens and nothing more, waiting requests holding none."""
        block_size = self.kv.block_size
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request.request_id
            assert len(request.block_ids) == cdiv(request.num_computed_tokens, block_size), (
                f"{request.request_id}: {len(request.block_ids)} blocks for "
                f"{request.num_computed_tokens} computed tokens"
            )
        for request in self.waiting:
            assert not request.block_ids and request.num_computed_tokens == 0, request.request_id
        self.kv.check_integrity([*self.running, *self.waiting])

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish requests by id; unknown or already finished ids are ignored."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self.finish(request, status)
