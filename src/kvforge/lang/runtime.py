"""The in-process engine as a frontend-language backend.

Every program (and every ``run_batch`` thread) sends its requests to one engine running in its
own thread, so they batch together and share the radix prefix cache: a continuation's prompt
extends the previous request's prompt, which the cache holds. ``select`` scores each choice by
the mean log-probability of its tokens after the prompt (SGLang's token-length-normalised
score), reading the prompt's log-probabilities of ``prompt + choice``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

from kvforge.lang.interpreter import Backend, Completion

_SENTINEL = "\x00kvforge-lang\x00"


def role_markers(tokenizer: Any) -> dict[str, tuple[str, str]]:
    """(prefix, suffix) of each chat role, cut out of the model's chat template rendered around
    a sentinel (each role after the turns a conversation puts before it)."""
    before = {
        "system": [],
        "user": [{"role": "system", "content": "s"}],
        "assistant": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
    }
    markers = {}
    for role, earlier in before.items():
        head = (
            tokenizer.apply_chat_template(earlier, add_generation_prompt=False) if earlier else ""
        )
        whole = tokenizer.apply_chat_template(
            [*earlier, {"role": role, "content": _SENTINEL}], add_generation_prompt=False
        )
        if not whole.startswith(head) or _SENTINEL not in whole:
            raise ValueError(f"the chat template does not render a {role} turn around its text")
        prefix, suffix = whole[len(head) :].split(_SENTINEL, 1)
        markers[role] = (prefix, suffix)
    return markers


class Engine(Backend):
    """A kvforge engine in this process (``model`` and engine options as for ``LLM``)."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        from kvforge.async_engine import AsyncLLM
        from kvforge.engine import LLMEngine
        from kvforge.entrypoints.llm import engine_config

        config = engine_config(model, **{"show_progress": False, **engine_options})
        self.llm = AsyncLLM(lambda: LLMEngine(config))
        self.tokenizer = self.llm.engine.tokenizer
        self.markers = role_markers(self.tokenizer)
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="kvforge-lang").start()

    def role_prefix(self, role: str) -> str:
        return self.markers[role][0]

    def role_suffix(self, role: str) -> str:
        return self.markers[role][1]

    def _request(self, prompt_ids: list[int], params: Any) -> Any:
        async def collect() -> Any:
            final = None
            request_id = f"lang-{next(self._ids)}"
            async for output in self.llm.generate(prompt_ids, params, request_id):
                final = output
            return final

        output = asyncio.run_coroutine_threadsafe(collect(), self._loop).result()
        if output is None or output.error:
            raise RuntimeError(f"the engine failed the request: {output and output.error}")
        return output

    def generate(self, prompt: str, sampling: dict[str, Any]) -> Completion:
        from kvforge.sampling_params import SamplingParams, StructuredOutputsParams

        options = dict(sampling)
        regex, schema = options.pop("regex", None), options.pop("json_schema", None)
        if regex is not None or schema is not None:
            options["structured_outputs"] = StructuredOutputsParams(json=schema, regex=regex)
        output = self._request(self.tokenizer.encode(prompt), SamplingParams(**options))
        ids = output.prompt_token_ids
        return Completion(
            output.outputs[0].text,
            len(ids),
            len(output.outputs[0].token_ids),
            output.num_cached_tokens,
        )

    def select(self, prompt: str, choices: list[str]) -> Completion:
        from kvforge.sampling_params import SamplingParams

        head = self.tokenizer.encode(prompt)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        scores, prompt_tokens, cached = [], 0, 0
        for choice in choices:
            ids = self.tokenizer.encode(prompt + choice)
            shared = next(
                (i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids))
            )
            shared = min(shared, len(ids) - 1)  # at least one token of the choice
            output = self._request(ids, params)
            entries = output.prompt_logprobs or []
            tail = [entries[i][ids[i]].logprob for i in range(shared, len(ids)) if entries[i]]
            scores.append(sum(tail) / max(1, len(tail)))
            prompt_tokens += len(ids)
            cached += output.num_cached_tokens
        best = max(range(len(choices)), key=scores.__getitem__)
        return Completion(choices[best], prompt_tokens, 0, cached, scores)

    def shutdown(self) -> None:
        """Stop the engine and its thread."""
        self.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
