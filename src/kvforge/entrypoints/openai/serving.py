"""Request handlers of the OpenAI-compatible and native APIs (routes stay thin)."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel

from kvforge.async_engine import AsyncLLM
from kvforge.clip.image import image_url_bytes
from kvforge.engine import LLMEngine
from kvforge.entrypoints.openai.metrics import RequestTracker, ServerMetrics
from kvforge.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
)
from kvforge.entrypoints.openai.tools import (
    call_constraint,
    chosen_functions,
    functions,
    parse_tool_calls,
    render_messages,
)
from kvforge.errors import InvalidRequestError, ModelNotFoundError
from kvforge.lora.request import LoRARequest
from kvforge.outputs import CompletionOutput, RequestOutput
from kvforge.sampling_params import SamplingParams

logger = logging.getLogger("kvforge.server")

Prompt = str | list[int]
MAX_EMBEDDING_INPUTS = 2048
MAX_SEQUENCES_PER_REQUEST = 1024
MAX_EMBEDDING_TOKENS = 1 << 16
EMBEDDING_BATCH_TOKENS = 512  # per forward pass (one longer prompt runs alone)


def _embed(engine: LLMEngine, group: list[list[int]]) -> torch.Tensor:
    return engine.runner.embed(group)


def _token_groups(prompts: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Consecutive prompts grouped so that each group holds at most ``max_tokens`` tokens."""
    groups: list[list[list[int]]] = [[]]
    size = 0
    for ids in prompts:
        if groups[-1] and size + len(ids) > max_tokens:
            groups.append([])
            size = 0
        groups[-1].append(ids)
        size += len(ids)
    return groups


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_chunk_head(request_id: str, model: str, created: int) -> dict[str, Any]:
    """The fields every chat.completion.chunk repeats."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}


def chat_chunk(
    head: dict[str, Any],
    index: int,
    delta: dict[str, Any],
    finish: str | None = None,
    logprobs: Any = None,
) -> str:
    """One chat.completion.chunk event for one choice."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return sse({**head, "choices": [choice]})


class OpenAIServing:
    """Turns API bodies into engine requests and engine outputs into API responses."""

    def __init__(
        self,
        llm: AsyncLLM,
        served_model_names: list[str],
        metrics: ServerMetrics,
        lora_modules: Sequence[LoRARequest] = (),
    ) -> None:
        self.llm = llm
        self.model_names = served_model_names
        self.metrics = metrics
        self.default_preset: str | None = None  # for requests that name no preset
        self.tokenizer = llm.engine.tokenizer
        # Adapters by served name (loaded into the engine at start; more at run time).
        self.loras: dict[str, LoRARequest] = {lora.lora_name: lora for lora in lora_modules}
        self._next_lora_id = max((lora.lora_int_id for lora in lora_modules), default=0) + 1
        self._loading: set[str] = set()

    # ---------------------------------------------------------------- common
    def check_model(self, name: str | None) -> str:
        """The served name for ``name`` (None = the default): the base model's names or an
        adapter's; unknown names raise 404."""
        if name is None or name in self.model_names or name in self.loras:
            return name or self.model_names[0]
        raise ModelNotFoundError(
            f"the model {name!r} does not exist; this server serves "
            f"{self.model_names + list(self.loras)}"
        )

    async def load_lora(self, name: str, path: str, scale: float, root: str | None) -> None:
        """Load an adapter at run time from a directory under ``root``; it serves as ``name``."""
        if name in self.model_names or name in self.loras or name in self._loading:
            raise InvalidRequestError(f"the name {name!r} is already served", "lora_name")
        real = os.path.realpath(path)
        if root is None or os.path.commonpath([real, os.path.realpath(root)]) != os.path.realpath(
            root
        ):
            raise InvalidRequestError(
                "lora_path must lie under the server's --lora-root", "lora_path"
            )
        lora = LoRARequest(name, self._next_lora_id, real, scale)
        self._next_lora_id += 1
        self._loading.add(name)  # a second load of the name while this one runs is refused
        try:
            await self.llm.acall(lambda engine: engine.add_lora(lora))
        finally:
            self._loading.discard(name)
        self.loras[name] = lora

    async def unload_lora(self, name: str) -> None:
        """Forget a served adapter (refused while requests use it)."""
        lora = self.loras.get(name)
        if lora is None:
            raise ModelNotFoundError(f"no LoRA adapter is served as {name!r}")
        await self.llm.acall(lambda engine: engine.remove_lora(lora.lora_int_id))
        del self.loras[name]

    async def run(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str,
        body: SamplingFields | None,
        lora: LoRARequest | None = None,
        images: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        """Engine outputs of one request (under ``body.model``'s adapter, or ``lora``), with
        metrics and one log line at the end."""
        tracker = RequestTracker(self.metrics)
        kwargs: dict[str, Any] = (
            {"priority": body.priority, "cache_salt": body.cache_salt} if body else {}
        )
        model = getattr(body, "model", None)
        lora = lora or (self.loras.get(model) if isinstance(model, str) else None)
        if lora is not None:
            kwargs["lora_request"] = lora
        if images is not None:
            kwargs["images"] = images
        last: RequestOutput | None = None
        async for output in self.llm.generate(prompt, params, request_id, **kwargs):
            tracker.observe(output)
            last = output
            yield output
        if last is not None and last.metrics is not None:
            m = last.metrics
            ttft = f"{m.time_to_first_token:.3f}s" if m.time_to_first_token is not None else "-"
            drafts = (
                f", drafts {m.num_accepted_tokens}/{m.num_draft_tokens} accepted"
                if m.num_draft_tokens
                else ""
            )
            logger.info(
                "request %s: %d prompt tokens (%d cached), %d generated, ttft %s, %.3fs%s",
                request_id,
                m.num_prompt_tokens,
                m.num_cached_tokens,
                sum(len(c.token_ids) for c in last.outputs),
                ttft,
                time.monotonic() - m.arrival_time,
                drafts,
            )

    async def collect(self, streams: Sequence[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        """Final outputs of several concurrent requests (aborts all if one fails)."""

        async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
            final = None
            async for output in stream:
                final = output
            assert final is not None
            return final

        return list(await asyncio.gather(*(last(s) for s in streams)))

    @staticmethod
    async def merge(
        streams: Sequence[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Interleave several output streams as (stream index, output)."""
        if len(streams) == 1:  # the common case: no pump task and queue hop per token
            stream = streams[0]
            try:
                async for output in stream:
                    yield 0, output
            finally:  # a disconnect closes us: close the engine stream now (it aborts)
                close = getattr(stream, "aclose", None)
                if close is not None:
                    await close()
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for output in stream:
                    await queue.put((index, output))
                await queue.put((index, None))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    @staticmethod
    def usage(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
        """OpenAI usage object over several requests."""
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in outputs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ----------------------------------------------------------- completions
    def completion_prompts(self, body: CompletionRequest) -> list[Prompt]:
        """Normalize ``prompt`` (string, strings, ids, id lists) into a list of prompts."""
        prompt = body.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def completion_logprobs(
        self, output: RequestOutput, completion: CompletionOutput, echo: bool
    ) -> dict[str, Any] | None:
        """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        if completion.logprobs is None:
            return None
        entries: list[tuple[int, Any]] = []
        if echo:
            entries.extend(zip(output.prompt_token_ids, output.prompt_logprobs or []))
        entries.extend(zip(completion.token_ids, completion.logprobs))
        tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
        for token_id, entry in entries:
            text = self._token_text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            token_logprobs.append(entry[token_id].logprob if entry else None)
            tops.append(
                {self._token_text(t): lp.logprob for t, lp in entry.items()} if entry else None
            )
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    async def completions(self, body: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        """POST /v1/completions."""
        model = self.check_model(body.model)
        prompts = self.completion_prompts(body)
        echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        body.preset = body.preset or self.default_preset
        params = body.sampling_params(body.max_tokens, body.logprobs, echo_logprobs)
        if len(prompts) * params.num_samples > MAX_SEQUENCES_PER_REQUEST:
            raise InvalidRequestError(
                f"{len(prompts)} prompts x {params.num_samples} samples exceed "
                f"{MAX_SEQUENCES_PER_REQUEST} sequences per request",
                "prompt",
            )
        base_id = f"cmpl-{uuid.uuid4().hex}"
        streams = [self.run(p, params, f"{base_id}-{i}", body) for i, p in enumerate(prompts)]
        created = int(time.time())
        if body.stream:
            return self._stream_completions(body, streams, base_id, model, created, params.n)
        outputs = await self.collect(streams)
        choices = []
        for i, output in enumerate(outputs):
            for completion in output.outputs:
                prefix = self._echo_text(output) if body.echo else ""
                choices.append(
                    {
                        "index": i * params.n + completion.index,
                        "text": prefix + completion.text,
                        "logprobs": self.completion_logprobs(output, completion, body.echo),
                        "finish_reason": completion.finish_reason,
                        "stop_reason": completion.stop_reason,
                    }
                )
        return {
            "id": base_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": self.usage(outputs),
        }

    def _echo_text(self, output: RequestOutput) -> str:
        return (
            output.prompt
            if output.prompt is not None
            else self.tokenizer.decode(output.prompt_token_ids)
        )

    async def _stream_completions(
        self,
        body: CompletionRequest,
        streams: list[AsyncIterator[RequestOutput]],
        base_id: str,
        model: str,
        created: int,
        n: int,
    ) -> AsyncIterator[str]:
        head = {"id": base_id, "object": "text_completion", "created": created, "model": model}
        deltas = TextDeltas()
        finals: list[RequestOutput] = []
        async for prompt_index, output in self.merge(streams):
            for completion in output.outputs:
                index = prompt_index * n + completion.index
                prefix = self._echo_text(output) if body.echo and deltas.is_new(index) else ""
                delta = deltas.next(index, completion)
                if delta is None:
                    continue
                yield sse(
                    {
                        **head,
                        "choices": [
                            {
                                "index": index,
                                "text": prefix + delta,
                                "logprobs": None,
                                "finish_reason": completion.finish_reason,
                                "stop_reason": completion.stop_reason,
                            }
                        ],
                    }
                )
            if output.finished:
                finals.append(output)
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": self.usage(finals)})
        yield sse("[DONE]")


class TextDeltas:
    """Tracks how much of each choice's text a stream has sent."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def is_new(self, index: int) -> bool:
        """True before the first delta of a choice."""
        return index not in self.sent

    def next(self, index: int, completion: CompletionOutput) -> str | None:
        """New text of a choice, "" for a bare finish, None when there is nothing to send."""
        if index in self.finished:
            return None
        start = self.sent.get(index, 0)
        delta = completion.text[start:]
        if not delta and completion.finish_reason is None and index in self.sent:
            return None
        self.sent[index] = len(completion.text)
        if completion.finish_reason is not None:
            self.finished.add(index)
        return delta


class ChatServing(OpenAIServing):
    """Chat completions, embeddings, tokenization and the native /generate endpoint."""

    def chat_prompt(
        self,
        body: ChatCompletionRequest | Any,
        messages: list[dict[str, Any]] | None = None,
        image_token_id: int | None = None,
    ) -> list[int]:
        """Token ids of the rendered conversation (images as ``image_token_id``)."""
        return self.tokenizer.encode_chat(
            messages if messages is not None else [m.as_template_dict() for m in body.messages],
            image_token_id,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=getattr(body, "continue_final_message", False),
            chat_template=getattr(body, "chat_template", None),
            tools=getattr(body, "tools", None),
            **(getattr(body, "chat_template_kwargs", None) or {}),
        )

    def chat_logprobs(
        self, completion: CompletionOutput, num_top: int, start: int = 0
    ) -> dict[str, Any] | None:
        """OpenAI chat logprobs for the completion's tokens from ``start`` on."""
        if completion.logprobs is None:
            return None

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = []
        for token_id, entry in zip(completion.token_ids[start:], completion.logprobs[start:]):
            tops = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank <= num_top)
            content.append(
                {
                    **item(token_id, entry[token_id].logprob),
                    "top_logprobs": [item(t, logprob) for _, t, logprob in tops],
                }
            )
        return {"content": content}

    async def chat(self, body: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        """POST /v1/chat/completions."""
        model = self.check_model(body.model)
        tools = functions(body.tools)
        choice = body.tool_choice
        mode, names = chosen_functions(
            tools, choice.model_dump() if isinstance(choice, BaseModel) else choice
        )
        body.preset = body.preset or self.default_preset
        params = body.sampling_params(body.effective_max_tokens, body.num_logprobs)

        def render() -> tuple[list[int], Any]:
            dicts = [m.as_template_dict() for m in body.messages]
            urls = [url for d in dicts for url in d.pop("images", [])]
            messages = render_messages(
                dicts,
                tools if mode != "none" else {},
                body.chat_template or self.tokenizer.chat_template,
            )
            if not urls:
                return self.chat_prompt(body, messages), None
            engine = self.llm.engine
            if engine.image_token_id is None:
                raise InvalidRequestError("this model does not take images", "messages")
            pixels = engine.preprocess_images([image_url_bytes(url) for url in urls])
            return self.chat_prompt(body, messages, engine.image_token_id), pixels

        prompt, pixels = await self.llm.offload(render)
        if mode in ("required", "named"):
            if params.use_beam_search:
                raise InvalidRequestError(
                    "tool_choice required or named is not supported with beam search",
                    "tool_choice",
                )
            if params.structured_outputs is not None:
                raise InvalidRequestError(
                    "tool_choice cannot be combined with another constraint", "tool_choice"
                )
            # The grammar makes the reply exactly the allowed calls: arguments always parse.
            parallel = body.parallel_tool_calls and mode == "required"
            params.structured_outputs = call_constraint(tools, names, parallel)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self.run(prompt, params, request_id, body, images=pixels)
        created = int(time.time())
        if body.stream:
            if mode != "none":  # calls are only known once the text is complete
                return self._stream_tool_chat(
                    stream, tools, request_id, model, created, body.include_usage
                )
            return self._stream_chat(body, stream, request_id, model, created)
        [output] = await self.collect([stream])
        choices = []
        for c in output.outputs:
            message, finish = self.chat_message(c, tools if mode != "none" else {})
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": self.chat_logprobs(c, body.num_logprobs or 0),
                    "finish_reason": finish,
                    "stop_reason": c.stop_reason,
                }
            )
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": self.usage([output]),
        }

    @staticmethod
    def chat_message(
        completion: CompletionOutput, tools: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a completion (with parsed tool calls) and its finish reason."""
        if not tools:
            return {"role": "assistant", "content": completion.text}, completion.finish_reason
        content, calls = parse_tool_calls(completion.text, tools)
        if not calls:
            return {"role": "assistant", "content": content}, completion.finish_reason
        finish = "tool_calls" if completion.finish_reason == "stop" else completion.finish_reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, finish

    async def _stream_tool_chat(
        self,
        stream: AsyncIterator[RequestOutput],
        tools: dict[str, Any],
        request_id: str,
        model: str,
        created: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        head = chat_chunk_head(request_id, model, created)

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
            return chat_chunk(head, index, delta, finish)

        final = None
        async for output in stream:
            final = output
        assert final is not None
        for c in final.outputs:
            yield chunk(c.index, {"role": "assistant", "content": ""})
            message, finish = self.chat_message(c, tools)
            if message.get("content"):
                yield chunk(c.index, {"content": message["content"]})
            for i, call in enumerate(message.get("tool_calls", [])):
                yield chunk(c.index, {"tool_calls": [{"index": i, **call}]})
            yield chunk(c.index, {}, finish)
        if include_usage:
            yield sse({**head, "choices": [], "usage": self.usage([final])})
        yield sse("[DONE]")

    async def _stream_chat(
        self,
        body: ChatCompletionRequest,
        stream: AsyncIterator[RequestOutput],
        request_id: str,
        model: str,
        created: int,
    ) -> AsyncIterator[str]:
        head = chat_chunk_head(request_id, model, created)

        def chunk(
            index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
        ) -> str:
            return chat_chunk(head, index, delta, finish, logprobs)

        deltas = TextDeltas()
        tokens_sent: dict[int, int] = {}
        final: RequestOutput | None = None
        async for output in stream:
            for c in output.outputs:
                if deltas.is_new(c.index):
                    yield chunk(c.index, {"role": "assistant", "content": ""})
                delta = deltas.next(c.index, c)
                if delta is None:
                    continue
                if delta:
                    logprobs = self.chat_logprobs(
                        c, body.num_logprobs or 0, tokens_sent.get(c.index, 0)
                    )
                    tokens_sent[c.index] = len(c.token_ids)
                    yield chunk(c.index, {"content": delta}, logprobs=logprobs)
                if c.finish_reason is not None:
                    yield chunk(c.index, {}, c.finish_reason)
            final = output
        if body.include_usage and final is not None:
            yield sse({**head, "choices": [], "usage": self.usage([final])})
        yield sse("[DONE]")

    # ------------------------------------------------------------ embeddings
    async def embeddings(self, body: Any) -> dict[str, Any]:
        """POST /v1/embeddings: mean-pooled, normalized final hidden states."""
        model = self.check_model(body.model)
        raw = body.input
        if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
            raw = [raw]
        if not raw:
            raise InvalidRequestError("input must not be empty", "input")
        engine = self.llm.engine
        if len(raw) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequestError(
                f"input has {len(raw)} items, at most {MAX_EMBEDDING_INPUTS} are allowed", "input"
            )
        # The tokenizer is thread-safe: tokenize in the worker pool, off the event loop.
        prompts = await self.llm.offload(lambda: [engine.tokenize_prompt(item) for item in raw])
        for ids in prompts:
            if len(ids) > engine.max_model_len:
                raise InvalidRequestError(
                    f"input has {len(ids)} tokens, more than the context length {engine.max_model_len}",
                    "input",
                )
        total = sum(len(p) for p in prompts)
        if total > MAX_EMBEDDING_TOKENS:
            raise InvalidRequestError(
                f"input has {total} tokens in all, at most {MAX_EMBEDDING_TOKENS} are allowed",
                "input",
            )
        # Bounded forward passes (scratch KV grows with the batch); the engine steps between.
        parts = []
        for group in _token_groups(prompts, EMBEDDING_BATCH_TOKENS):
            parts.append(await self.llm.acall(functools.partial(_embed, group=group)))
        vectors = torch.cat(parts)
        if body.encoding_format == "base64":  # little-endian float32, as the OpenAI client expects
            data: list[Any] = [
                base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors
            ]
        else:
            data = vectors.tolist()
        return {
            "object": "list",
            "model": model,
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)
            ],
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }

    # ---------------------------------------------------------- tokenization
    async def tokenize(self, body: Any) -> dict[str, Any]:
        """POST /tokenize: a prompt or chat messages to token ids (in the worker pool)."""
        self.check_model(body.model)
        if body.messages is not None:
            tokens = await self.llm.offload(self.chat_prompt, body)
        elif body.prompt is not None:
            tokens = await self.llm.offload(
                self.tokenizer.encode, body.prompt, body.add_special_tokens
            )
        else:
            raise InvalidRequestError("give either prompt or messages", "prompt")
        return {
            "count": len(tokens),
            "max_model_len": self.llm.engine.max_model_len,
            "tokens": tokens,
        }

    async def detokenize(self, body: Any) -> dict[str, Any]:
        """POST /detokenize: token ids to text."""
        self.check_model(body.model)
        self.tokenizer.check_token_ids(body.tokens, self.llm.engine.vocab_size, "tokens")
        text = await self.llm.offload(self.tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    # --------------------------------------------------------- native API
    def _generate_result(
        self, output: RequestOutput, completion: CompletionOutput, body: GenerateRequest
    ) -> dict[str, Any]:
        finish = None
        if completion.finish_reason is not None:
            finish = {"type": completion.finish_reason, "matched": completion.stop_reason}
        meta: dict[str, Any] = {
            "id": output.request_id,
            "prompt_tokens": len(output.prompt_token_ids),
            "completion_tokens": len(completion.token_ids),
            "cached_tokens": output.num_cached_tokens,
            "finish_reason": finish,
        }
        if body.return_logprob:
            # SGLang's shape: [logprob, token id, text] per token ([None, id, ...] for the first
            # prompt token), and the top alternatives the same way when asked
            start = max(0, body.logprob_start_len)
            if body.logprob_start_len >= 0:
                entries = output.prompt_logprobs or []
                ids = output.prompt_token_ids
                meta["input_token_logprobs"] = _sglang_logprobs(ids[start:], entries[start:])
                if body.top_logprobs_num:
                    meta["input_top_logprobs"] = _sglang_top(entries[start:])
            sampled = list(completion.logprobs or [])
            meta["output_token_logprobs"] = _sglang_logprobs(completion.token_ids, sampled)
            if body.top_logprobs_num:
                meta["output_top_logprobs"] = _sglang_top(sampled)
        return {"text": completion.text, "output_ids": completion.token_ids, "meta_info": meta}

    async def generate(self, body: GenerateRequest) -> Any:
        """POST /generate (SGLang shape): text plus meta info; streaming sends cumulative text."""
        if (body.text is None) == (body.input_ids is None):
            raise InvalidRequestError("give exactly one of text or input_ids", "text")
        prompt: Prompt = body.text if body.text is not None else list(body.input_ids or [])
        params = body.to_sampling_params()
        lora = None
        if body.lora_path is not None:  # SGLang names a served adapter here
            self.check_model(body.lora_path)
            lora = self.loras.get(body.lora_path)
        stream = self.run(prompt, params, body.rid or f"gen-{uuid.uuid4().hex}", None, lora)
        if body.stream:
            return self._stream_generate(stream, body)
        [output] = await self.collect([stream])
        results = [self._generate_result(output, c, body) for c in output.outputs]
        return results[0] if len(results) == 1 else results

    async def _stream_generate(
        self, stream: AsyncIterator[RequestOutput], body: GenerateRequest
    ) -> AsyncIterator[str]:
        async for output in stream:
            for completion in output.outputs:
                result = self._generate_result(output, completion, body)
                yield sse({**result, "index": completion.index})
        yield sse("[DONE]")


def _sglang_logprobs(token_ids: list[int], entries: list[Any]) -> list[list[Any]]:
    """[logprob, token id, None] per token (logprob None where there is none)."""
    out = []
    for token, entry in zip(token_ids, entries):
        chosen = entry.get(token) if entry else None
        out.append([chosen.logprob if chosen is not None else None, token, None])
    return out


def _sglang_top(entries: list[Any]) -> list[list[list[Any]] | None]:
    """The alternatives of each position as [logprob, token id, None], best first."""
    tops: list[list[list[Any]] | None] = []
    for entry in entries:
        if not entry:
            tops.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda item: item[1].rank)
        tops.append([[lp.logprob, token, None] for token, lp in ranked])
    return tops
