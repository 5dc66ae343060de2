"""ModelRunner: owns weights, KV tensors and the sampler; runs one scheduled step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from kvforge.config import CacheConfig, EngineConfig, ModelConfig
from kvforge.core.step_io import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from kvforge.errors import InvalidRequestError
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.huge_pages import move_to_huge_pages
from kvforge.layers.kv_cache import PagedKVCache, RecentBlocks, block_bytes, kv_storage_dtype
from kvforge.layers.moe import LayerExpertStats
from kvforge.loader import LoadedModel, load_model
from kvforge.lora.manager import LoRAManager
from kvforge.lora.request import LoRARequest
from kvforge.outputs import RequestFailure
from kvforge.parallel.group import RankContext
from kvforge.runner.input_batch import CachedRequestState, InputBatch
from kvforge.sample import Sampler, SamplingMetadata, gather_logprobs
from kvforge.sample.rejection import RejectionSampler
from kvforge.sample.sampler import plain_greedy
from kvforge.spec_decode.draft import DraftModel
from kvforge.tokenizer import Tokenizer
from kvforge.utils import available_memory, cdiv, format_size

logger = logging.getLogger(__name__)
# A request in the step's sampling or verification list: (state, row in logits, ...).
_Item = TypeVar("_Item", bound=tuple[Any, ...])
_State = TypeVar("_State", bound=CachedRequestState)

# Default KV budget when none is given: room for max_num_seqs sequences of the served context
# length, at most this share of the RAM available at start.
_DEFAULT_KV_FRACTION = 0.25
# One-byte KV caches keep exact copies of each running sequence's first and last two blocks
# (see RecentBlocks), by default in at most this share of the KV budget.
_RECENT_PER_SEQUENCE = 3
_RECENT_BUDGET_SHARE = 1 / 64


class ModelRunner:
    """Turns a SchedulerOutput into a ForwardBatch, runs the model and samples."""

    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        parallel: RankContext | None = None,
    ) -> None:
        """``parallel``: this process is one rank of a split model (see parallel/worker.py);
        only rank 0 (the driver) samples, the others run their share of each step."""
        self.config = config
        self.parallel = parallel
        self.device = torch.device(config.model_config.device)
        # Unseeded random sampling draws from the global generator: reproducible per start.
        torch.manual_seed(config.model_config.seed)
        self.loaded = loaded or load_model(
            config.model_config,
            None,
            config.show_progress,
            parallel.shard if parallel is not None else None,
        )
        self.model = self.loaded.model
        self.model_config = self.loaded.config
        huge_pages = config.model_config.huge_pages and self.device.type == "cpu"
        if huge_pages:
            move_to_huge_pages(self.model)
        start, end = self.model.layer_range
        self.num_local_layers = end - start
        tp = parallel.shard.tp if parallel is not None else None
        self.num_local_kv_heads = self.model_config.num_kv_heads // (tp.size if tp else 1)
        cache = config.cache_config
        self.block_size = cache.block_size
        spec = config.speculative_config
        spec.check()  # before loading a draft model
        self.drafter: DraftModel | None = None
        if spec.method == "draft":
            assert spec.model is not None  # check() guarantees it
            model_config = config.model_config
            self.drafter = DraftModel(
                ModelConfig(
                    model=spec.model,
                    device=model_config.device,
                    attention_backend=model_config.attention_backend,
                    huge_pages=model_config.huge_pages,
                ),
                self.model_config.vocab_size,
                config.show_progress,
            )
        self.kv_dtype = kv_storage_dtype(cache.kv_cache_dtype, self.loaded.kv_dtype)
        self.num_blocks, recent_capacity = self._num_blocks(cache)
        self.recent = (
            RecentBlocks(recent_capacity, self.num_blocks, self.device) if recent_capacity else None
        )
        cfg = self.model_config
        self.kv_caches = [
            PagedKVCache.allocate(
                self.num_blocks,
                self.block_size,
                self.num_local_kv_heads,
                cfg.head_dim,
                self.loaded.kv_dtype,
                self.device,
                cache.kv_cache_dtype,
                cache.calculate_kv_scales,
                recent=self.recent,
                huge_pages=huge_pages,
            )
            for _ in range(self.num_local_layers)
        ]
        if self.drafter is not None:
            per_request = cdiv(spec.num_speculative_tokens + 1, self.block_size) + 1
            self.drafter.allocate(
                self.num_blocks,
                self.block_size,
                per_request * config.scheduler_config.max_num_seqs,
            )
        self.lora: LoRAManager | None = None
        if config.lora_config.enabled:
            self.lora = LoRAManager.for_model(self.model, config.lora_config)
        self.sampler = Sampler()
        self.rejection_sampler = RejectionSampler()
        self.input_batch = InputBatch(self.block_size, config.scheduler_config.max_num_seqs)

    def _bytes_per_block(self, kv_cache_dtype: str, model_dtype: torch.dtype) -> int:
        cfg = self.model_config
        one_layer = block_bytes(
            kv_cache_dtype, model_dtype, self.block_size, self.num_local_kv_heads, cfg.head_dim
        )
        return self.num_local_layers * one_layer

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block over all layers (K and V), the draft model's included."""
        draft = self.drafter.bytes_per_block(self.block_size) if self.drafter else 0
        return draft + self._bytes_per_block(
            self.config.cache_config.kv_cache_dtype, self.loaded.kv_dtype
        )

    def _num_blocks(self, cache: CacheConfig) -> tuple[int, int]:
        """Blocks in the pool and exact recent-block copies that fit the KV budget."""
        budget = cache.kv_cache_memory
        if budget is None and cache.num_blocks is None:
            budget = self._default_kv_budget()
        exact_block = self._bytes_per_block("auto", self.loaded.kv_dtype)
        recent = 0
        if cache.kv_cache_dtype != "auto" and cache.kv_cache_recent_blocks is not None:
            recent = cache.kv_cache_recent_blocks
        elif cache.kv_cache_dtype != "auto":
            recent = _RECENT_PER_SEQUENCE * self.config.scheduler_config.max_num_seqs
            if budget is not None:
                share = int(budget * _RECENT_BUDGET_SHARE) // exact_block
                recent = min(recent, max(_RECENT_PER_SEQUENCE, share))
        if cache.num_blocks is not None:
            return cache.num_blocks, recent
        assert budget is not None
        recent_bytes = (recent + 1) * exact_block if recent else 0  # +1: the spare slot
        num_blocks = max(1, (budget - recent_bytes) // self.bytes_per_block)
        if self.parallel is not None:  # the budget is per rank; every rank needs the same pool
            num_blocks = self.parallel.min_over_ranks(num_blocks)
        logger.info(
            "KV cache: %s in %d blocks of %d tokens (%s per block, %s)",
            format_size(num_blocks * self.bytes_per_block),
            num_blocks,
            self.block_size,
            format_size(self.bytes_per_block),
            self.kv_dtype,
        )
        if cache.kv_cache_dtype != "auto":
            if recent:
                logger.info(
                    "KV cache: exact %s copies of %d recent blocks (%s)",
                    self.loaded.kv_dtype,
                    recent,
                    format_size(recent_bytes),
                )
            for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
                logger.info(
                    "KV cache: %s holds %.2fx the blocks of %s in the same memory",
                    cache.kv_cache_dtype,
                    num_blocks / (budget // self._bytes_per_block("auto", dtype)),
                    name,
                )
        return int(num_blocks), recent

    def _default_kv_budget(self) -> int:
        """KV bytes for ``max_num_seqs`` full-length sequences, capped by available RAM."""
        max_num_seqs = self.config.scheduler_config.max_num_seqs
        context = (
            self.config.model_config.max_model_len or self.model_config.max_position_embeddings
        )
        blocks = max_num_seqs * cdiv(context, self.block_size)
        wanted = blocks * self.bytes_per_block
        cap = int(available_memory() * _DEFAULT_KV_FRACTION)
        logger.info(
            "KV cache: %d sequences x %d tokens (max_num_seqs x max_model_len) need %s; %s "
            "(%d%% of available RAM) is the cap; --kv-cache-memory overrides",
            max_num_seqs,
            context,
            format_size(wanted),
            format_size(cap),
            round(100 * _DEFAULT_KV_FRACTION),
        )
        return min(wanted, cap)

    # ------------------------------------------------------------------ step
    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self.loaded.tokenizer

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[images, tokens per image, hidden] embeddings of preprocessed pixels (a vision chat
        model's tower and projector)."""
        vision = self.loaded.vision
        assert vision is not None
        return vision.encode(pixels.to(self.device)).to(self.loaded.dtype)

    def expert_stats(self) -> list[LayerExpertStats]:
        """Routing counters of the mixture-of-experts layers (empty for a dense model)."""
        return self.model.expert_stats()

    @torch.inference_mode()
    def execute(
        self, output: SchedulerOutput, sampled: dict[str, list[int]] | None = None
    ) -> ModelRunnerOutput:
        """Run the scheduled tokens, sample where a request reached its last known token.
        ``sampled``: on a rank other than 0, the tokens rank 0 sampled in the previous step."""
        for request_id, token_ids in (sampled or {}).items():
            known = self.input_batch.requests.get(request_id)
            if known is not None:
                self.input_batch.append_tokens(known, token_ids)
        states = self._update_states(output)
        self._copy_blocks(output.blocks_to_copy)
        result = ModelRunnerOutput()
        lora_batch = None
        if self.lora is not None:
            lost: dict[int, Exception] = {}
            lora_batch = self.lora.batch(
                [s.lora_id for s in states], [s.num_scheduled for s in states], lost
            )
            for state in states:  # computed as the base model's, but never sampled
                if state.lora_id in lost:
                    result.failed[state.request_id] = _describe(lost[state.lora_id])
        logit_rows: list[int] = []
        sample_reqs: list[tuple[CachedRequestState, int]] = []  # (request, row in logits)
        # (request, first row, n, first pos)
        prompt_reqs: list[tuple[CachedRequestState, int, int, int]] = []
        # (request, first row in logits, its draft tokens): k + 1 rows each
        spec_reqs: list[tuple[CachedRequestState, int, list[int]]] = []
        offset = 0
        for state in states:
            start, num_new = state.num_computed_tokens, state.num_scheduled
            if state.request_id in result.failed:
                offset += num_new
                continue
            drafts = output.draft_token_ids.get(state.request_id)
            if drafts:
                self.input_batch.set_drafts(state, drafts)
                spec_reqs.append((state, len(logit_rows), drafts))
                logit_rows.extend(range(offset + num_new - len(drafts) - 1, offset + num_new))
                offset += num_new
                continue
            # The last position whose logits predict a prompt token.
            last_prompt_pos = state.num_prompt_tokens - 2
            if state.sampling_params.prompt_logprobs is not None and start <= last_prompt_pos:
                count = min(start + num_new - 1, last_prompt_pos) - start + 1
                prompt_reqs.append((state, len(logit_rows), count, start))
                logit_rows.extend(range(offset, offset + count))
            if start + num_new == state.num_tokens:
                sample_reqs.append((state, len(logit_rows)))
                logit_rows.append(offset + num_new - 1)
            offset += num_new
        if self.recent is not None:
            self.recent.update(
                [s.block_ids for s in states],
                [s.num_computed_tokens for s in states],
                [s.num_scheduled for s in states],
                self.block_size,
            )
        if self.parallel is not None and self.parallel.layout.pp > 1:
            staged = self._pipeline(states)
            if staged is None:  # a later stage: the first stage samples
                return result
            hidden = staged
        else:
            batch = self.input_batch.forward_batch(states, self.device)
            batch.lora = lora_batch
            hidden = self.model(batch, self.kv_caches)
            if self.drafter is not None:
                self._mirror(states, batch, output.draft_token_ids)
        if len(logit_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(logit_rows, dtype=torch.long, device=self.device)]
        logits = self.model.compute_logits(hidden)  # an all-gather when the head is split
        if self.parallel is not None and not self.parallel.is_driver:
            return result  # rank 0 samples, and sends the tokens with the next step
        bitmasks = self._bitmask_rows(output)
        if sample_reqs:
            self._isolated(
                lambda reqs: self._sample(logits, reqs, bitmasks, result),
                sample_reqs,
                result,
                "sampling",
            )
        if spec_reqs:
            self._isolated(
                lambda reqs: self._verify(logits, reqs, bitmasks, result),
                spec_reqs,
                result,
                "draft verification",
            )
        for state, row, count, first_pos in prompt_reqs:
            try:
                entries = self._prompt_logprobs(logits[row : row + count], state, first_pos)
            except Exception as exc:  # noqa: BLE001 - fails this request only
                result.failed[state.request_id] = _describe(exc)
                continue
            result.prompt_logprobs[state.request_id] = (first_pos, entries)
        for request_id, token_ids in zip(result.request_ids, result.sampled_token_ids):
            self.input_batch.append_tokens(self.input_batch.requests[request_id], token_ids)
        if self.drafter is not None and output.draft_lengths:
            self._propose_drafts(output.draft_lengths, result)
        return result

    def _pipeline(self, states: list[CachedRequestState]) -> torch.Tensor | None:
        """Pipeline parallelism: the step's requests in micro-batches, each sent through the
        stages in turn (stage s runs micro-batch i while stage s + 1 runs i - 1); the last stage
        sends its hidden states back to the first, which returns them normed (None elsewhere)."""
        assert self.parallel is not None
        ctx = self.parallel
        groups = _micro_batches(states, ctx.micro_batches)
        batches = [self.input_batch.forward_batch(group, self.device) for group in groups]
        width, dtype = self.model_config.hidden_size, self.loaded.dtype
        sends = []
        received: list[torch.Tensor] = []
        for tag, batch in enumerate(batches):
            incoming = None
            if not ctx.first_stage:
                incoming = ctx.recv_hidden(len(batch.input_ids), width, dtype, tag, self.device)
            hidden = self.model.forward_stage(batch, self.kv_caches, incoming)
            sends.append(ctx.send_hidden(hidden, tag))
        if ctx.first_stage:
            for tag, batch in enumerate(batches):
                received.append(
                    ctx.recv_hidden(len(batch.input_ids), width, dtype, tag, self.device)
                )
        for handle in sends:
            handle.wait()
        if not ctx.first_stage:
            return None
        return self.model.norm(torch.cat(received))

    def memory_plan(self) -> dict[str, int]:
        """This rank's layers, weight and KV bytes (the parallel memory planner's row)."""
        start, end = self.model.layer_range
        return {
            "layers": end - start,
            "first_layer": start,
            "kv_heads": self.num_local_kv_heads,
            "weight_bytes": self.loaded.weight_bytes,
            "kv_bytes": self.num_blocks
            * self._bytes_per_block(self.config.cache_config.kv_cache_dtype, self.loaded.kv_dtype),
        }

    def add_lora(self, request: LoRARequest) -> None:
        """Load (and check) an adapter that requests may name; InvalidRequestError if bad."""
        if self.lora is None:
            raise InvalidRequestError(
                "LoRA adapters are not enabled (start the engine with --enable-lora)",
                "lora_request",
            )
        self.lora.add(request)

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter; False if it was not loaded."""
        return self.lora is not None and self.lora.remove(lora_id)

    def _mirror(
        self,
        states: list[CachedRequestState],
        batch: ForwardBatch,
        drafts: dict[str, list[int]],
    ) -> None:
        """Run the draft model over the step's tokens it lacks (see spec_decode/draft.py): the
        target's batch as it is, unless a request verifies drafts (proposing wrote their KV) or
        the draft is behind a request's computed tokens."""
        assert self.drafter is not None
        spans: list[tuple[CachedRequestState, int, int]] = []
        same = True
        for state in states:
            if drafts.get(state.request_id):
                same = False
                continue
            start = min(state.draft_computed, state.num_computed_tokens)
            end = state.num_computed_tokens + state.num_scheduled
            same &= start == state.num_computed_tokens
            spans.append((state, start, end - start))
            state.draft_computed = end
        if same:
            self.drafter.mirror(batch)
        elif spans:
            self.drafter.mirror(
                self.input_batch.span_batch(
                    [state for state, _, _ in spans],
                    np.array([start for _, start, _ in spans], dtype=np.int64),
                    np.array([count for _, _, count in spans], dtype=np.int64),
                    self.device,
                )
            )

    def _propose_drafts(self, lengths: dict[str, int], result: ModelRunnerOutput) -> None:
        """The draft model's proposals for the requests that sampled this step."""
        assert self.drafter is not None
        sampled = set(result.request_ids) - set(result.failed)
        states = [self.input_batch.requests[r] for r in lengths if r in sampled]
        if not states:
            return
        # The draft lacks each request's tokens from its written positions (at most the
        # target's computed ones, all but the token just sampled) on.
        starts = [min(s.draft_computed, s.num_tokens - 1) for s in states]
        try:
            drafts, written = self.drafter.propose(
                [
                    self.input_batch.token_ids[s.row, a : s.num_tokens].tolist()
                    for s, a in zip(states, starts)
                ],
                starts,
                [s.block_ids for s in states],
                [lengths[s.request_id] for s in states],
            )
        except Exception:  # noqa: BLE001 - no drafts this time; decoding goes on without them
            logger.exception("the draft model failed to propose")
            return
        for state, end in zip(states, written):
            state.draft_computed = end
        result.draft_token_ids = {s.request_id: d for s, d in zip(states, drafts)}

    def _update_states(self, output: SchedulerOutput) -> list[CachedRequestState]:
        """Apply the step's diff to the persistent batch; the scheduled states in batch order."""
        batch = self.input_batch
        for request_id in output.finished_request_ids:
            batch.remove(request_id)
        for new in output.new_requests:
            batch.add(new)
        for cached in output.cached_requests:
            batch.update(cached)
        states = []
        for request_id, num_new in output.num_scheduled_tokens.items():
            state = batch.requests[request_id]
            state.num_scheduled = num_new
            states.append(state)
        return states

    def _bitmask_rows(self, output: SchedulerOutput) -> dict[str, torch.Tensor]:
        """Each structured-output request's rows [1 + drafts, W] of the step's grammar
        bitmask."""
        if output.grammar_bitmask is None:
            return {}
        rows: dict[str, list[int]] = {}
        for index, request_id in enumerate(output.grammar_request_ids):
            rows.setdefault(request_id, []).append(index)
        return {rid: output.grammar_bitmask[index] for rid, index in rows.items()}

    def _isolated(
        self,
        run: Callable[[list[_Item]], None],
        reqs: list[_Item],
        result: ModelRunnerOutput,
        what: str,
    ) -> None:
        """``run(reqs)`` (sampling or verification of the batch); if that raises, one request
        at a time, so only the culprits fail."""
        try:
            run(reqs)
            return
        except Exception as exc:  # noqa: BLE001 - attributed below
            if len(reqs) == 1:
                result.failed[reqs[0][0].request_id] = _describe(exc)
                return
        logger.warning("batched %s failed; %d requests one by one", what, len(reqs))
        for item in reqs:
            try:
                run([item])
            except Exception as exc:  # noqa: BLE001 - fails this request only
                result.failed[item[0].request_id] = _describe(exc)

    def _sample(
        self,
        logits: torch.Tensor,
        reqs: list[tuple[CachedRequestState, int]],
        bitmasks: dict[str, torch.Tensor],
        result: ModelRunnerOutput,
    ) -> None:
        bitmask = self._grammar_bitmask([r for r, _ in reqs], bitmasks)
        if bitmask is not None:
            keep = self._drop_dead_ends(reqs, bitmask, result)
            if len(keep) < len(reqs):
                reqs, bitmask = [reqs[i] for i in keep], bitmask[keep]
            if not reqs:
                return
        rows = torch.tensor([row for _, row in reqs], device=self.device)
        states = [r for r, _ in reqs]
        if bitmask is None and all(plain_greedy(r.sampling_params) for r in states):
            banned = [self._banned_tokens(r, len(r.output_token_ids)) for r in states]
            tokens, chosen = self.sampler.greedy(logits[rows], banned)
            for state, token, logprob in zip(states, tokens.tolist(), chosen.tolist(), strict=True):
                result.add(state.request_id, [token], [logprob])
            return
        md = SamplingMetadata.build(
            [r.sampling_params for r in states],
            [r.prompt_token_ids for r in states],
            [r.output_token_ids for r in states],
            [self._banned_tokens(r, len(r.output_token_ids)) for r in states],
            {i: g for i, r in enumerate(states) if (g := self._generator(r)) is not None},
            self.model_config.vocab_size,
            self.device,
            None if bitmask is None else bitmask.to(self.device),
        )
        out = self.sampler(logits[rows], md)
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist()
        ranks = out.ranks.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, state in enumerate(states):
            result.add(state.request_id, [token_ids[i]], [logprobs[i]])
            num_top = state.sampling_params.logprobs
            if num_top is not None:
                top = (
                    list(zip(top_ids[i][:num_top], top_lps[i][:num_top]))
                    if top_ids and top_lps
                    else []
                )
                result.logprobs[state.request_id] = [
                    TokenLogprobs(token_ids[i], logprobs[i], ranks[i], top)
                ]

    def _verify(
        self,
        logits: torch.Tensor,
        reqs: list[tuple[CachedRequestState, int, list[int]]],
        bitmasks: dict[str, torch.Tensor],
        result: ModelRunnerOutput,
    ) -> None:
        """Accept a prefix of each request's drafts plus one token (see sample/rejection);
        structured-output requests come with a grammar bitmask row per position."""
        rows: list[int] = []
        params, prompts, outputs, banned = [], [], [], []
        for state, first, drafts in reqs:
            rows.extend(range(first, first + len(drafts) + 1))
            for j in range(len(drafts) + 1):
                # Row j sees drafts 0..j-1 as generated tokens (penalties, min_tokens).
                generated = state.output_token_ids + drafts[:j]
                params.append(state.sampling_params)
                prompts.append(state.prompt_token_ids)
                outputs.append(generated)
                banned.append(self._banned_tokens(state, len(generated)))
        bitmask = self._grammar_bitmask(
            [state for state, _, _ in reqs], bitmasks, [len(d) + 1 for _, _, d in reqs]
        )
        md = SamplingMetadata.build(
            params,
            prompts,
            outputs,
            banned,
            {},
            self.model_config.vocab_size,
            self.device,
            None if bitmask is None else bitmask.to(self.device),
        )
        index = torch.tensor(rows, device=self.device)
        verified = self.rejection_sampler(
            logits[index],
            md,
            [drafts for _, _, drafts in reqs],
            [self._generator(state) for state, _, _ in reqs],
            [state.sampling_params.logprobs for state, _, _ in reqs],
        )
        for (state, _, _), out in zip(reqs, verified):
            result.add(state.request_id, out.token_ids, out.logprobs)
            if state.sampling_params.logprobs is not None:
                result.logprobs[state.request_id] = [
                    TokenLogprobs(*entry)
                    for entry in zip(out.token_ids, out.logprobs, out.ranks, out.top)
                ]

    def _prompt_logprobs(
        self, logits: torch.Tensor, request: CachedRequestState, first_pos: int
    ) -> list[TokenLogprobs]:
        num_top = request.sampling_params.prompt_logprobs or 0
        targets = request.prompt_token_ids[first_pos + 1 : first_pos + 1 + logits.shape[0]]
        out = gather_logprobs(
            logits.log_softmax(-1), torch.tensor(targets, device=logits.device), num_top
        )
        ids, lps, ranks = out.token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        tops = (
            [
                list(zip(i, lp))
                for i, lp in zip(out.top_token_ids.tolist(), out.top_logprobs.tolist())
            ]
            if out.top_token_ids is not None and out.top_logprobs is not None
            else [[] for _ in ids]
        )
        return [TokenLogprobs(*entry) for entry in zip(ids, lps, ranks, tops)]

    def _grammar_bitmask(
        self,
        states: list[CachedRequestState],
        bitmasks: dict[str, torch.Tensor],
        num_rows: list[int] | None = None,
    ) -> torch.Tensor | None:
        """Rows of the scheduler's bitmask for ``states``, ``num_rows[i]`` rows each (default
        one; a request verifying k drafts has k + 1), all ones for free rows."""
        if not any(s.request_id in bitmasks for s in states):
            return None
        counts = num_rows or [1] * len(states)
        words = cdiv(self.model_config.vocab_size, 32)
        bitmask = torch.full((sum(counts), words), -1, dtype=torch.int32)  # all allowed
        row = 0
        for state, count in zip(states, counts):
            allowed = bitmasks.get(state.request_id)
            if allowed is not None:
                bitmask[row : row + count] = allowed[:count]
            row += count
        return bitmask

    @staticmethod
    def _drop_dead_ends(
        reqs: list[tuple[CachedRequestState, int]],
        bitmask: torch.Tensor,
        result: ModelRunnerOutput,
    ) -> list[int]:
        """Fail the requests whose grammar allows no token at all (e.g. a choice with a
        character the vocabulary cannot spell); returns the indices that go on sampling."""
        alive = bitmask.any(dim=1).tolist()
        for (request, _), ok in zip(reqs, alive):
            if not ok:
                result.failed[request.request_id] = RequestFailure(
                    "the structured output constraint cannot be completed with this model's "
                    f"vocabulary: no token continues it after {len(request.output_token_ids)} "
                    "generated tokens",
                    400,
                )
        return [i for i, ok in enumerate(alive) if ok]

    @staticmethod
    def _banned_tokens(request: CachedRequestState, num_generated: int) -> list[int]:
        """Stop tokens banned while fewer than min_tokens are generated."""
        params = request.sampling_params
        if num_generated >= params.min_tokens:
            return []
        banned = list(params.stop_token_ids or [])
        if not params.ignore_eos:
            banned.extend(request.eos_token_ids)
        return banned

    def _generator(self, state: CachedRequestState) -> torch.Generator | None:
        seed = state.sampling_params.seed
        if seed is None or state.sampling_params.is_greedy:
            return None
        if state.generator is None:
            state.generator = torch.Generator(device=self.device).manual_seed(seed)
        return state.generator

    def _scratch_forward(
        self, prompts: list[list[int]], chunk_size: int | None = None
    ) -> torch.Tensor:
        """Final hidden states [T, E] of whole prompts on scratch KV (the serving cache and
        its blocks are untouched; the scratch shares the cache's format and scales).

        With ``chunk_size``, every prompt advances that many tokens per forward pass, so
        later tokens read earlier ones back from the cache as decoding does (1: one token
        per step)."""
        tables, next_block = [], 0
        for ids in prompts:
            count = cdiv(len(ids), self.block_size)
            tables.append(list(range(next_block, next_block + count)))
            next_block += count
        recent = (
            self.recent.like(_RECENT_PER_SEQUENCE * len(prompts), next_block)
            if self.recent is not None
            else None
        )
        scratch = [cache.like(next_block, recent) for cache in self.kv_caches]
        longest = max(len(ids) for ids in prompts)
        step = chunk_size or longest
        parts: list[list[torch.Tensor]] = [[] for _ in prompts]
        for start in range(0, longest, step):
            active = [i for i, ids in enumerate(prompts) if start < len(ids)]
            chunks = [prompts[i][start : start + step] for i in active]
            starts = [start] * len(active)
            if recent is not None:
                recent.update(
                    [tables[i] for i in active], starts, [len(c) for c in chunks], self.block_size
                )
            batch = ForwardBatch.build(
                chunks, starts, [tables[i] for i in active], self.block_size, self.device
            )
            hidden = self.model(batch, scratch)
            for i, part in zip(active, hidden.split([len(c) for c in chunks])):
                parts[i].append(part)
        return torch.cat([torch.cat(p) for p in parts])

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        """Mean-pooled, L2-normalized final hidden states [N, E] of whole prompts."""
        hidden = self._scratch_forward(prompts).float()  # [T, E]
        pooled = torch.stack([chunk.mean(0) for chunk in hidden.split([len(p) for p in prompts])])
        return torch.nn.functional.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Float32 logits [T, V] at every position of one sequence (teacher forcing); see
        :meth:`score_many` for ``chunk_size``."""
        return self.score_many([token_ids], chunk_size)[0]

    @torch.inference_mode()
    def score_many(
        self, sequences: list[list[int]], chunk_size: int | None = None
    ) -> list[torch.Tensor]:
        """Float32 logits [T_i, V] of several sequences in one batch. ``chunk_size`` feeds
        each that many tokens per step, as chunked prefill (or, at 1, decoding) would."""
        hidden = self._scratch_forward(sequences, chunk_size)
        logits = self.model.compute_logits(hidden)
        return list(logits.split([len(s) for s in sequences]))

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:
            cache.copy_blocks(src, dst)
        if self.drafter is not None:
            self.drafter.copy_blocks(src, dst)


def _micro_batches(states: list[_State], count: int) -> list[list[_State]]:
    """``states`` cut into at most ``count`` runs of about equal scheduled tokens (in order, so
    the micro-batches' hidden states concatenate to the whole batch's)."""
    total = sum(s.num_scheduled for s in states)
    groups: list[list[_State]] = [[]]
    done = 0
    for state in states:
        limit = total * len(groups) / count
        if groups[-1] and done >= limit and len(groups) < count:
            groups.append([])
        groups[-1].append(state)
        done += state.num_scheduled
    return groups


def _describe(exc: BaseException) -> RequestFailure:
    """A one-line account of a per-request failure, logged with its traceback."""
    logger.error("request failed in the model runner", exc_info=exc)
    return RequestFailure(f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
