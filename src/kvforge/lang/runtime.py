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
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from kvforge.lang.interpreter import Backend, Completion

_SENTINEL = "KVFORGELANGSENTINEL"
_KNOWN_TEXTS = 1024  # produced texts whose token ids the in-process backend keeps


def role_markers(render: Callable[[list[dict[str, str]]], str]) -> dict[str, tuple[str, str]]:
    """(prefix, suffix) of each chat role, cut out of the model's chat template (``render``:
    messages to text, without a generation prompt) rendered around a sentinel, each role after
    the turns a conversation puts before it."""
    before: dict[str, list[dict[str, str]]] = {
        "system": [],
        "user": [{"role": "system", "content": "s"}],
        "assistant": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
    }
    markers = {}
    for role, earlier in before.items():
        head = render(earlier) if earlier else ""
        whole = render([*earlier, {"role": role, "content": _SENTINEL}])
        if not whole.startswith(head) or _SENTINEL not in whole:
            raise ValueError(f"the chat template does not render a {role} turn around its text")
        prefix, suffix = whole[len(head) :].split(_SENTINEL, 1)
        markers[role] = (prefix, suffix)
    return markers


def _choice_start(head: list[int], ids: list[int]) -> int:
    """Where a choice's tokens begin in ``ids`` (prompt + choice), given the prompt's own tokens
    ``head`` (they can merge at the boundary), keeping at least one token."""
    shared = 0
    for a, b in zip(head, ids):
        if a != b:
            break
        shared += 1
    return min(shared, len(ids) - 1)


class _TokenContinuity:
    """Texts a backend produced (a prompt plus its generated text) and their token ids: a later
    prompt that extends one reuses its ids and tokenizes only the new text, so each request is
    an exact token prefix of the next (what the radix cache matches), even where tokenizing the
    whole text again would merge tokens across the boundary."""

    def __init__(self) -> None:
        self._known: OrderedDict[str, list[int]] = OrderedDict()
        self._known_lock = threading.Lock()

    def _tokenize(self, text: str, special: bool) -> list[int]:
        raise NotImplementedError

    def _detokenize(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, continuing the ids of the longest produced text it extends."""
        with self._known_lock:
            best = max((k for k in self._known if text.startswith(k)), key=len, default="")
            ids = list(self._known[best]) if best else []
            if best:
                self._known.move_to_end(best)
        if not best:
            return self._tokenize(text, True)
        rest = text[len(best) :]
        return ids + (self._tokenize(rest, False) if rest else [])

    def _choice_logprobs(self, ids: list[int], start: int) -> tuple[list[float], int]:
        """Log-probabilities of ``ids[start:]`` given what precedes them, and the prompt tokens
        the backend found cached."""
        raise NotImplementedError

    def _prefill(self, ids: list[int]) -> int:
        """Compute ``ids`` (one token generated and dropped); the prompt tokens found cached."""
        raise NotImplementedError

    def cache_prefix(self, prompt: str) -> Completion:
        ids = self.encode(prompt)
        cached = self._prefill(ids)
        self._remember(prompt, ids, "", [])
        return Completion("", len(ids), 0, cached)

    def select(self, prompt: str, choices: list[str], messages: list[dict[str, str]]) -> Completion:
        """Each choice scored by the mean log-probability of its tokens after ``prompt`` (one
        request per choice over the cached prompt)."""
        head = self.encode(prompt)
        encoded = [self.encode(prompt + choice) for choice in choices]
        if not prompt:
            raise ValueError("select needs text before it (a first token has no probability)")
        scores, cached = [], 0
        for ids in encoded:
            tail, hits = self._choice_logprobs(ids, _choice_start(head, ids))
            # a choice with no scored token (merged into the first one) never wins
            scores.append(sum(tail) / len(tail) if tail else float("-inf"))
            cached += hits
        best = max(range(len(choices)), key=scores.__getitem__)
        self._remember(prompt + choices[best], encoded[best], "", [])
        prompt_tokens = sum(len(ids) for ids in encoded)
        return Completion(choices[best], prompt_tokens, 0, cached, scores)

    def _remember(self, prompt: str, prompt_ids: list[int], text: str, ids: list[int]) -> None:
        """Keep ``prompt + text`` as ``prompt_ids + ids`` when the ids decode to the text (a
        stop string trimmed from the text would not)."""
        if ids and self._detokenize(ids) != text:
            return
        with self._known_lock:
            self._known[prompt + text] = [*prompt_ids, *ids]
            self._known.move_to_end(prompt + text)
            while len(self._known) > _KNOWN_TEXTS:
                self._known.popitem(last=False)


class Engine(_TokenContinuity, Backend):
    """A kvforge engine in this process (``model`` and engine options as for ``LLM``)."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        from kvforge.async_engine import AsyncLLM
        from kvforge.engine import LLMEngine
        from kvforge.entrypoints.llm import engine_config

        config = engine_config(model, **{"show_progress": False, **engine_options})
        self.llm = AsyncLLM(lambda: LLMEngine(config))
        self.tokenizer = self.llm.engine.tokenizer
        self.markers = role_markers(
            lambda messages: self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=False
            )
        )
        self._ids = itertools.count()
        _TokenContinuity.__init__(self)
        self._loop = asyncio.new_event_loop()
        self._closed = False
        threading.Thread(target=self._loop.run_forever, daemon=True, name="kvforge-lang").start()

    def role_prefix(self, role: str) -> str:
        return self.markers[role][0]

    def role_suffix(self, role: str) -> str:
        return self.markers[role][1]

    def _request(
        self, prompt_ids: list[int], params: Any, on_text: Callable[[str], None] | None = None
    ) -> Any:
        async def collect() -> Any:
            final = None
            request_id = f"lang-{next(self._ids)}"
            async for output in self.llm.generate(prompt_ids, params, request_id):
                final = output
                if on_text is not None and not output.finished:
                    on_text(output.outputs[0].text)
            return final

        if self._closed:
            raise RuntimeError("the engine backend was shut down")
        output = asyncio.run_coroutine_threadsafe(collect(), self._loop).result()
        if output is None or output.error:
            raise RuntimeError(f"the engine failed the request: {output and output.error}")
        return output

    def _tokenize(self, text: str, special: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special)  # type: ignore[no-any-return]

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, False)  # type: ignore[no-any-return]

    def generate(
        self,
        prompt: str,
        sampling: dict[str, Any],
        messages: list[dict[str, str]],
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        from kvforge.sampling_params import SamplingParams, StructuredOutputsParams

        options = dict(sampling)
        regex, schema = options.pop("regex", None), options.pop("json_schema", None)
        if regex is not None or schema is not None:
            options["structured_outputs"] = StructuredOutputsParams(json=schema, regex=regex)
        output = self._request(self.encode(prompt), SamplingParams(**options), on_text)
        ids = output.prompt_token_ids
        generated = output.outputs[0]
        self._remember(prompt, ids, generated.text, generated.token_ids)
        return Completion(
            output.outputs[0].text,
            len(ids),
            len(output.outputs[0].token_ids),
            output.num_cached_tokens,
        )

    def _prefill(self, ids: list[int]) -> int:
        from kvforge.sampling_params import SamplingParams

        output = self._request(ids, SamplingParams(max_tokens=1, temperature=0.0))
        return int(output.num_cached_tokens)

    def _choice_logprobs(self, ids: list[int], start: int) -> tuple[list[float], int]:
        from kvforge.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        output = self._request(ids, params)
        entries = output.prompt_logprobs or []
        tail = [entries[i][ids[i]].logprob for i in range(start, len(ids)) if entries[i]]
        return tail, output.num_cached_tokens

    def shutdown(self) -> None:
        """Stop the engine and its thread; later requests fail."""
        self._closed = True
        self.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)


def _events(client: Any, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream (an error event raises)."""
    with client.stream("POST", path, json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{path} answered {reply.status_code}: {reply.read()[:300]!r}")
        for line in reply.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{path} failed mid-stream: {event['error']}")
            yield event
    raise RuntimeError(f"{path}: the stream ended before its [DONE] event")


# the frontend's gen options under /generate's (SGLang's) names
_NATIVE_NAMES = {"max_tokens": "max_new_tokens"}


class RuntimeEndpoint(_TokenContinuity, Backend):
    """A kvforge server over its native ``/generate`` (``base_url`` without ``/v1``); prompts
    travel as token ids (see ``_TokenContinuity``)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        import httpx

        _TokenContinuity.__init__(self)

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.markers = role_markers(self._render)

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        reply = self.client.post(path, json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"{path} answered {reply.status_code}: {reply.text[:300]}")
        return reply.json()

    def _render(self, messages: list[dict[str, str]]) -> str:
        body = {"messages": messages, "add_generation_prompt": False}
        tokens = self._post("/tokenize", body)["tokens"]
        return str(self._post("/detokenize", {"tokens": tokens})["prompt"])

    def _tokenize(self, text: str, special: bool) -> list[int]:
        body = {"prompt": text, "add_special_tokens": special}
        return list(self._post("/tokenize", body)["tokens"])

    def _detokenize(self, ids: list[int]) -> str:
        return str(self._post("/detokenize", {"tokens": ids})["prompt"])

    def role_prefix(self, role: str) -> str:
        return self.markers[role][0]

    def role_suffix(self, role: str) -> str:
        return self.markers[role][1]

    def generate(
        self,
        prompt: str,
        sampling: dict[str, Any],
        messages: list[dict[str, str]],
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        params = {_NATIVE_NAMES.get(k, k): v for k, v in sampling.items()}
        ids = self.encode(prompt)
        body = {"input_ids": ids, "sampling_params": params}
        if on_text is None:
            reply = self._post("/generate", body)
        else:  # each event holds the text so far; the last one the ids and counts
            reply = {}
            for reply in _events(self.client, "/generate", {**body, "stream": True}):
                on_text(reply["text"])
            if "meta_info" not in reply:
                raise RuntimeError("/generate ended its stream without a result")
        self._remember(prompt, ids, reply["text"], reply["output_ids"])
        meta = reply["meta_info"]
        return Completion(
            reply["text"], meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]
        )

    def _prefill(self, ids: list[int]) -> int:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
        return int(self._post("/generate", body)["meta_info"]["cached_tokens"])

    def _choice_logprobs(self, ids: list[int], start: int) -> tuple[list[float], int]:
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": start,
        }
        meta = self._post("/generate", body)["meta_info"]
        tail = [lp for lp, _, _ in meta["input_token_logprobs"] if lp is not None]
        return tail, int(meta["cached_tokens"])


class OpenAI(Backend):
    """An OpenAI-compatible endpoint (``base_url`` ending in ``/v1``). Programs with chat turns
    go to ``/chat/completions`` as messages (a gen inside an assistant turn that already holds
    text continues it with vLLM's ``continue_final_message``); programs without turns go to
    ``/completions``. ``select`` cannot read prompt log-probabilities there: it asks for a
    constrained choice (``guided_choice``, which kvforge and vLLM servers honour) at
    temperature 0, so it picks the choice the model would generate, not the best normalised
    score, and reports no scores."""

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, timeout: float = 600.0
    ):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def role_prefix(self, role: str) -> str:
        return ""  # turns travel as messages

    def role_suffix(self, role: str) -> str:
        return ""

    def _complete(
        self,
        prompt: str,
        messages: list[dict[str, str]],
        body: dict[str, Any],
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        body = {"model": self.model, **body}
        if messages:
            if messages[-1]["role"] != "assistant":
                raise ValueError("with a chat endpoint, gen and select run inside assistant()")
            if "".join(m["content"] for m in messages) != prompt:
                raise ValueError(
                    "with a chat endpoint, text outside the chat turns cannot be sent: put it "
                    "inside system(), user() or assistant()"
                )
            if messages[-1]["content"]:
                body.update(continue_final_message=True, add_generation_prompt=False)
            else:
                messages = messages[:-1]
            path, body["messages"] = "/chat/completions", messages
        else:
            path, body["prompt"] = "/completions", prompt
        if on_text is None:
            reply = self.client.post(path, json=body)
            if reply.status_code != 200:
                raise RuntimeError(f"{path} answered {reply.status_code}: {reply.text[:300]}")
            data = reply.json()
            choice = data["choices"][0]
            text = (choice["message"]["content"] if messages else choice["text"]) or ""
            usage = data.get("usage") or {}
        else:
            body.update(stream=True, stream_options={"include_usage": True})
            text, usage = "", {}
            for event in _events(self.client, path, body):
                for choice in event.get("choices") or []:
                    piece = choice["delta"].get("content") if messages else choice.get("text")
                    if piece:
                        text += piece
                        on_text(text)
                usage = event.get("usage") or usage
        details = usage.get("prompt_tokens_details") or {}
        return Completion(
            text,
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            details.get("cached_tokens") or 0,
        )

    def generate(
        self,
        prompt: str,
        sampling: dict[str, Any],
        messages: list[dict[str, str]],
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        body = dict(sampling)
        schema = body.pop("json_schema", None)
        if schema is not None:
            schema = json.loads(schema) if isinstance(schema, str) else schema
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "gen", "schema": schema},
            }
        return self._complete(prompt, messages, body, on_text)

    def select(self, prompt: str, choices: list[str], messages: list[dict[str, str]]) -> Completion:
        body = {"guided_choice": choices, "temperature": 0, "max_tokens": 256}
        result = self._complete(prompt, messages, body)
        if result.text not in choices:
            raise RuntimeError(f"the endpoint answered {result.text!r}, not one of {choices}")
        return result
