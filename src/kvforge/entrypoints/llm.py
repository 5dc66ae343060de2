"""LLM: the offline Python API (``from kvforge import LLM, SamplingParams``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from kvforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from kvforge.engine import LLMEngine
from kvforge.errors import InvalidRequestError
from kvforge.outputs import RequestOutput
from kvforge.sampling_params import SamplingParams
from kvforge.tokenizer import Tokenizer
from kvforge.utils import parse_size

Prompt = str | Sequence[int] | dict[str, Any]
Message = dict[str, Any]


def engine_config(
    model: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    quantization: str | None = None,
    quantization_group_size: int | None = None,
    quantization_symmetric: bool = True,
    kv_cache_dtype: str = "auto",
    calculate_kv_scales: bool = False,
    kv_cache_recent_blocks: int | None = None,
    max_model_len: int | None = None,
    seed: int = 0,
    chat_template: str | None = None,
    block_size: int = 16,
    kv_cache_memory: str | int | None = None,
    num_blocks: int | None = None,
    enable_prefix_caching: bool = True,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    enable_chunked_prefill: bool = True,
    long_prefill_token_threshold: int = 0,
    scheduling_policy: str = "fcfs",
    show_progress: bool = True,
) -> EngineConfig:
    """Build an EngineConfig from flat keyword arguments (the CLI flags, by name)."""
    return EngineConfig(
        model_config=ModelConfig(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            seed=seed,
            chat_template=chat_template,
            quantization=quantization,
            quantization_group_size=quantization_group_size,
            quantization_symmetric=quantization_symmetric,
        ),
        cache_config=CacheConfig(
            block_size=block_size,
            kv_cache_memory=parse_size(kv_cache_memory) if kv_cache_memory is not None else None,
            num_blocks=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
            kv_cache_dtype=kv_cache_dtype,
            calculate_kv_scales=calculate_kv_scales,
            kv_cache_recent_blocks=kv_cache_recent_blocks,
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            long_prefill_token_threshold=long_prefill_token_threshold,
            policy=scheduling_policy,
        ),
        show_progress=show_progress,
    )


class LLM:
    """Generate for many prompts at once with continuous batching, like vLLM's ``LLM``."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(engine_config(model, **kwargs))

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
    ) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in the order of ``prompts``."""
        prompt_list = self._as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompt_list):
                raise InvalidRequestError("need one SamplingParams per prompt", "sampling_params")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                if isinstance(prompt, dict):
                    prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))  # type: ignore[assignment]
                ids.append(
                    self.engine.add_request(
                        prompt,  # type: ignore[arg-type]
                        params,
                        priority=priority[i] if priority else 0,
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
    ) -> list[RequestOutput]:
        """Reply to one conversation or a list of them, rendered with the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.engine.tokenizer.encode_chat(
                list(conv),  # type: ignore[arg-type]
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                tools=tools,
                **(chat_template_kwargs or {}),
            )
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

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
