"""LLMEngine: tokenize -> schedule -> run -> update -> detokenize, one step at a time."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvforge.beam_search import BeamSearchGroup
from kvforge.config import EngineConfig
from kvforge.core.kv_cache_manager import KVCacheManager
from kvforge.core.scheduler import Scheduler
from kvforge.errors import ContextLengthError, InvalidRequestError
from kvforge.lora.request import LoRARequest
from kvforge.multimodal import ImageInput, expand_placeholders
from kvforge.output_processor import OutputProcessor, RequestState
from kvforge.outputs import CompletionOutput, RequestFailure, RequestMetrics, RequestOutput
from kvforge.request import Request, RequestStatus
from kvforge.runner import ModelRunner
from kvforge.sampling_params import SamplingParams
from kvforge.structured import StructuredOutputManager, create_grammar_backend
from kvforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
# User request ids: printable, bounded, and never containing '#' (internal child ids do).
_REQUEST_ID = re.compile(r"[\w.:@/+=~-]{1,256}")


class LLMEngine:
    """Owns the scheduler, the KV cache manager, the model runner and the output processor."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        config.scheduler_config.check()
        config.cache_config.check()
        config.speculative_config.check()
        config.lora_config.check()
        self.config = config
        if runner is None and config.parallel_config.world_size > 1:
            from kvforge.parallel.executor import ParallelRunner

            runner = ParallelRunner(config)  # type: ignore[assignment]
        self.runner = runner or ModelRunner(config)
        self.tokenizer: Tokenizer = self.runner.tokenizer
        model_cfg = self.runner.model_config
        self.vocab_size = model_cfg.vocab_size
        cache = config.cache_config
        capacity = self.runner.num_blocks * cache.block_size
        self.max_model_len = min(
            config.model_config.max_model_len or model_cfg.max_position_embeddings, capacity
        )
        self.kv_cache_manager = KVCacheManager(
            self.runner.num_blocks, cache.block_size, cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler_config,
            self.kv_cache_manager,
            self.max_model_len,
            self.vocab_size,
            config.speculative_config,
            config.lora_config.max_loras if config.lora_config.enabled else 0,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured: StructuredOutputManager | None = None
        self.beam_groups: dict[str, BeamSearchGroup] = {}
        self._beam_states: dict[str, RequestState] = {}
        self._ids = itertools.count()
        logger.info(
            "KV cache holds %d blocks = %d tokens; max_model_len %d; up to %.1f concurrent "
            "full-length sequences",
            self.runner.num_blocks,
            capacity,
            self.max_model_len,
            capacity / self.max_model_len,
        )

    # ------------------------------------------------------------ requests
    def structured_outputs(self) -> StructuredOutputManager:
        """The grammar manager, created (and its backend imported) on first use."""
        if self.structured is None:
            backend = create_grammar_backend("xgrammar", self.tokenizer, self.vocab_size)
            self.structured = StructuredOutputManager(backend)
        return self.structured

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load and check an adapter (requests may then name it); InvalidRequestError if bad."""
        self.runner.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Unload an adapter; refused while requests use it. False if it was not loaded."""
        users = sum(1 for r in self.scheduler.requests.values() if r.lora_id == lora_id)
        if users:
            raise InvalidRequestError(
                f"the adapter is in use by {users} request(s); unload it when they finish",
                "lora_name",
            )
        return self.runner.remove_lora(lora_id)

    def tokenize_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a text prompt, or validated ids of a token prompt."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)  # type: ignore[arg-type]  # checked above: not a str
            self.tokenizer.check_token_ids(ids, self.vocab_size)
        else:
            raise InvalidRequestError("a prompt is a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return ids

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        lora_request: LoRARequest | None = None,
        images: Sequence[Any] | None = None,
    ) -> str:
        """Validate and queue a request; returns its id. Bad input raises InvalidRequestError.

        ``prompt_token_ids`` are the ids of a text ``prompt`` tokenized by the caller (the
        server tokenizes in worker threads, never on the engine thread). ``lora_request``
        runs it under an adapter (loaded on first use). ``images`` (PIL images, bytes, paths
        or preprocessed [3, H, W] tensors) go where the prompt holds the vision model's image
        placeholder token, once per image (one token or already the model's tokens per image).
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams", "params")
        params.check()  # again: the caller may have changed fields since construction
        params.validate_vocab(self.vocab_size)
        request_id = request_id or f"req-{next(self._ids)}"
        if not _REQUEST_ID.fullmatch(request_id):
            raise InvalidRequestError(
                "a request id is 1-256 letters, digits or ._:@/+=~- (no '#', which the engine "
                "uses for the ids of samples and beams)",
                "request_id",
            )
        if request_id in self.output_processor.states or request_id in self._beam_states:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if prompt_token_ids is not None:
            prompt_ids = self.tokenize_prompt(prompt_token_ids)
        else:
            prompt_ids = self.tokenize_prompt(prompt)
        mm_inputs: list[ImageInput] = []
        if images is not None and len(images):
            if params.use_beam_search:
                raise InvalidRequestError("beam search does not take images", "images")
            prompt_ids, mm_inputs = self._images(prompt_ids, images)
        max_tokens = self._check_length(prompt_ids, params)
        lora_id = 0
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise InvalidRequestError("lora_request must be a LoRARequest", "lora_request")
            self.runner.add_lora(lora_request)
            lora_id = lora_request.lora_int_id
        constraint = params.structured_outputs
        if constraint is not None:  # fail closed before admission
            self.structured_outputs().check_satisfiable(constraint, self.vocab_size)
        sched = self.config.scheduler_config
        if not sched.enable_chunked_prefill and len(prompt_ids) > sched.max_num_batched_tokens:
            raise ContextLengthError(
                f"prompt has {len(prompt_ids)} tokens, more than max_num_batched_tokens "
                f"({sched.max_num_batched_tokens}) with chunked prefill disabled",
                "prompt",
            )
        state = RequestState(
            request_id,
            prompt if isinstance(prompt, str) else None,
            prompt_ids,
            params,
            time.monotonic(),
        )
        eos = frozenset(self.tokenizer.eos_token_ids)

        def child(index: int, child_params: SamplingParams, parent: Request | None) -> Request:
            return Request(
                request_id=request_id if params.num_samples == 1 else f"{request_id}#{index}",
                prompt_token_ids=prompt_ids,
                sampling_params=child_params,
                eos_token_ids=eos,
                arrival_time=state.arrival_time,
                priority=priority,
                cache_salt=cache_salt,
                max_tokens=max_tokens,
                lora_id=lora_id,
                fork_parent=parent,
                grammar=self.structured_outputs().matcher(constraint) if constraint else None,
                mm_inputs=mm_inputs,
            )

        if params.use_beam_search:
            beam_params = dataclasses.replace(
                params,
                n=1,
                best_of=None,
                temperature=0.0,
                logprobs=2 * params.n,
                ignore_eos=True,
                stop=None,
                stop_token_ids=None,
                use_beam_search=False,
            )
            first = child(0, beam_params, None)
            first.request_id = f"{request_id}#beam"
            self.beam_groups[request_id] = BeamSearchGroup(
                request_id, params.n, max_tokens, params.length_penalty, eos, [first]
            )
            self._beam_states[request_id] = state
            self.scheduler.add_request(first)
            return request_id
        children: list[Request] = []
        for index in range(params.num_samples):
            child_params = params
            if params.seed is not None and index > 0:  # distinct but reproducible samples
                child_params = dataclasses.replace(params, seed=(params.seed + index) % 2**64)
            children.append(child(index, child_params, children[0] if index else None))
        children[0].num_pending_forks = len(children) - 1
        self.output_processor.add(state, children)
        for request in children:
            self.scheduler.add_request(request)
        return request_id

    @property
    def image_token_id(self) -> int | None:
        """The placeholder token of a vision chat model's images (None: text only)."""
        vision = getattr(getattr(self.runner, "loaded", None), "vision", None)
        return None if vision is None else int(vision.config.image_token_id)

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """[n, 3, size, size] pixels of images (PIL, bytes, paths; preprocessed tensors pass)
        for this model's vision tower; thread-safe (the server calls it in its workers)."""
        from kvforge.clip.image import Preprocess

        vision = getattr(getattr(self.runner, "loaded", None), "vision", None)
        if vision is None:
            raise InvalidRequestError("this model does not take images", "images")
        config = vision.config
        size = config.tower.image_size
        preprocess = Preprocess(size, config.image_mean, config.image_std)
        return torch.stack(
            [
                image
                if isinstance(image, torch.Tensor) and tuple(image.shape) == (3, size, size)
                else preprocess(image)
                for image in images
            ]
        )

    def _images(
        self, prompt_ids: list[int], images: Sequence[Any]
    ) -> tuple[list[int], list[ImageInput]]:
        """The prompt with each image's placeholders expanded, and the images encoded."""
        pixels = self.preprocess_images(images)
        config = self.runner.loaded.vision.config  # type: ignore[attr-defined, union-attr]
        length = config.tokens_per_image
        ids, offsets = expand_placeholders(prompt_ids, config.image_token_id, length, len(images))
        if not torch.isfinite(pixels).all():
            raise InvalidRequestError("image pixels must be finite", "images")
        embeds = self.runner.encode_images(pixels)
        inputs = []
        for offset, picture, vectors in zip(offsets, pixels, embeds):
            digest = hashlib.blake2b(picture.numpy().tobytes(), digest_size=8).digest()
            inputs.append(ImageInput(offset, length, int.from_bytes(digest) >> 1, vectors))
        return ids, inputs

    def _check_length(self, prompt_ids: list[int], params: SamplingParams) -> int:
        num_prompt = len(prompt_ids)
        if num_prompt >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {num_prompt} tokens; the context holds {self.max_model_len} "
                f"(at least one must be left to generate)",
                "prompt",
            )
        room = self.max_model_len - num_prompt
        if params.min_tokens > room:
            raise ContextLengthError(
                f"min_tokens ({params.min_tokens}) exceeds the room left in the context "
                f"({room} tokens after a {num_prompt}-token prompt)",
                "min_tokens",
            )
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ContextLengthError(
                f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length of {self.max_model_len}",
                "max_tokens",
            )
        return params.max_tokens

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests and free their KV blocks; unknown ids are ignored."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            children = self.output_processor.abort(request_id)
            group = self.beam_groups.pop(request_id, None)
            self._beam_states.pop(request_id, None)
            if group is not None:
                children = [b.request_id for b in group.live]
            self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished_requests()

    # ----------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and return the outputs of requests that advanced."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        runner_output = self.runner.execute(scheduler_output)
        # NOTE: a failure that belongs to one request fails that request only (its blocks are
        # freed, its caller gets an error output); anything else propagates and stops the loop.
        self.scheduler.finish_requests(runner_output.failed, RequestStatus.FINISHED_ABORTED)
        changed = self.scheduler.update(scheduler_output, runner_output)
        outputs, stopped, failed = self.output_processor.process(changed, runner_output)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        outputs.extend(self._fail_requests({**runner_output.failed, **failed}))
        outputs.extend(self._step_beams(runner_output))
        return outputs

    def _fail_requests(self, failures: dict[str, RequestFailure]) -> list[RequestOutput]:
        """Finish the user requests owning the failed child ids with an error output."""
        outputs: list[RequestOutput] = []
        for child_id, error in failures.items():
            logger.error("request %s failed: %s", child_id, error.message)
            result = self.output_processor.fail(child_id, error)
            if result is None:
                result = self._fail_beam_group(child_id, error)
            if result is not None:
                output, children = result
                self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
                outputs.append(output)
        return outputs

    def _fail_beam_group(
        self, child_id: str, error: RequestFailure
    ) -> tuple[RequestOutput, list[str]] | None:
        for request_id, group in self.beam_groups.items():
            if any(beam.request_id == child_id for beam in group.live):
                return self._drop_beam_group(request_id, error)
        return None

    def _drop_beam_group(
        self, request_id: str, error: RequestFailure
    ) -> tuple[RequestOutput, list[str]]:
        group = self.beam_groups.pop(request_id)
        state = self._beam_states.pop(request_id)
        output = RequestOutput(
            request_id,
            state.prompt,
            state.prompt_token_ids,
            [],
            True,
            error=error.message,
            error_status=error.status,
        )
        return output, [beam.request_id for beam in group.live]

    def _step_beams(self, runner_output) -> list[RequestOutput]:  # type: ignore[no-untyped-def]
        finished: list[RequestOutput] = []
        for request_id, group in list(self.beam_groups.items()):
            try:
                group.step(self.scheduler, runner_output)
            except Exception as exc:  # noqa: BLE001 - fails this beam search only
                logger.error("beam search %s failed", request_id, exc_info=exc)
                output, children = self._drop_beam_group(
                    request_id, RequestFailure(f"{type(exc).__name__}: {exc}")
                )
                self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
                finished.append(output)
                continue
            if group.finished:
                del self.beam_groups[request_id]
                finished.append(self._beam_output(self._beam_states.pop(request_id), group))
        return finished

    def _beam_output(self, state: RequestState, group: BeamSearchGroup) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(beam.token_ids, state.params.skip_special_tokens),
                token_ids=beam.token_ids,
                cumulative_logprob=beam.cumulative_logprob,
                finish_reason=beam.finish_reason,
            )
            for i, beam in enumerate(group.best())
        ]
        metrics = RequestMetrics(
            arrival_time=state.arrival_time,
            num_prompt_tokens=len(state.prompt_token_ids),
            num_generation_tokens=sum(len(o.token_ids) for o in outputs),
            finished_time=time.monotonic(),
        )
        return RequestOutput(
            state.request_id, state.prompt, state.prompt_token_ids, outputs, True, metrics=metrics
        )

    # -------------------------------------------------------------- helpers
    def shutdown(self) -> None:
        """Stop the engine's worker processes, if it has any."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    @property
    def num_preemptions(self) -> int:
        """Requests preempted (and recomputed) so far."""
        return self.scheduler.num_preemptions
