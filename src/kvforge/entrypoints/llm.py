"""LLM: the offline Python API (``from kvforge import LLM, SamplingParams``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from kvforge.clip.image import image_url_bytes
from kvforge.config import EngineConfig
from kvforge.engine import LLMEngine
from kvforge.engine_args import EngineArgs
from kvforge.errors import InvalidRequestError
from kvforge.lora.request import LoRARequest
from kvforge.multimodal import chat_images
from kvforge.outputs import RequestOutput
from kvforge.sampling_params import SamplingParams
from kvforge.tokenizer import Tokenizer

Prompt = str | Sequence[int] | dict[str, Any]
Message = dict[str, Any]


def engine_config(model: str | None = None, **kwargs: Any) -> EngineConfig:
    """An EngineConfig from flat keyword arguments (the fields of :class:`EngineArgs`)."""
    return EngineArgs(model, **kwargs).create_engine_config()


class LLM:
    """Generate for many prompts at once with continuous batching, like vLLM's ``LLM``."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(engine_config(model, **kwargs))

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor / pipeline / expert parallelism); also
        done at exit."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in the order of ``prompts``.
        ``lora_request``: one adapter for all prompts, or one (or None) per prompt."""
        prompt_list = self._as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompt_list):
                raise InvalidRequestError("need one SamplingParams per prompt", "sampling_params")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        if isinstance(lora_request, Sequence):
            if len(lora_request) != len(prompt_list):
                raise InvalidRequestError("need one lora_request per prompt", "lora_request")
            loras = list(lora_request)
        else:
            loras = [lora_request] * len(prompt_list)
        ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                images = None
                if isinstance(prompt, dict):  # vLLM's shape: images in multi_modal_data
                    images = (prompt.get("multi_modal_data") or {}).get("image")
                    if images is not None and not isinstance(images, (list, tuple)):
                        images = [images]
                    prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))  # type: ignore[assignment]
                ids.append(
                    self.engine.add_request(
                        prompt,  # type: ignore[arg-type]
                        params,
                        priority=priority[i] if priority else 0,
                        lora_request=loras[i],
                        images=images,
                    )
                )
        except BaseException:
            self.engine.abort_request(ids)  # nothing half-queued stays behind
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation or a list of them, rendered with the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Any] = []
        for conv in conversations:
            rendered, urls = [], []
            for message in conv:  # image_url parts (data URLs) of a vision chat model
                text, found = chat_images(dict(message))  # type: ignore[arg-type]
                rendered.append(text)
                urls += found
            ids = self.engine.tokenizer.encode_chat(
                rendered,
                self.engine.image_token_id if urls else None,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                tools=tools,
                **(chat_template_kwargs or {}),
            )
            if urls:
                images = [image_url_bytes(url) for url in urls]
                prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}})
            else:
                prompts.append(ids)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    @staticmethod
    def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        items = list(prompts)
        if items and all(isinstance(t, int) for t in items):
            return [items]  # type: ignore[list-item]  # one prompt of token ids
        return items  # type: ignore[return-value]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(request_ids)
            raise
        finally:
            bar.close()
        return [finished[i] for i in request_ids]
