"""OpenAI-compatible request bodies (pydantic) and their mapping to SamplingParams."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvforge.errors import InvalidRequestError
from kvforge.multimodal import chat_images
from kvforge.presets import sampling_preset
from kvforge.sampling_params import SamplingParams, StructuredOutputsParams
from kvforge.tokenizer.chat_template import RESERVED_TEMPLATE_NAMES

# Samples per request (n, best_of, beams): each is a sequence in the batch.
MAX_N = 16
# chat_template_kwargs may not collide with what the renderer passes itself.
RESERVED_CHAT_TEMPLATE_KWARGS = RESERVED_TEMPLATE_NAMES | {
    "chat_template",
    "continue_final_message",
}


class APIModel(BaseModel):
    """Base of request bodies and their parts: strict types ("3" and true are not numbers),
    finite numbers only, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class RequestBody(APIModel):
    """A whole request body: also refuses text that is not valid Unicode anywhere in it."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data


def check_unicode(data: Any) -> None:
    """Raise InvalidRequestError if any string (or key) in ``data`` has a lone surrogate."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequestError(
                    "the request contains an invalid character (a lone surrogate)"
                ) from exc
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_num_samples(params: SamplingParams) -> SamplingParams:
    """The server's cap on sequences per request (``n``, ``best_of``, beam width)."""
    for name in ("n", "best_of"):
        value = getattr(params, name)
        if value is not None and value > MAX_N:
            raise InvalidRequestError(f"{name} must be at most {MAX_N}, got {value}", name)
    return params


class StreamOptions(APIModel):
    """``stream_options`` of OpenAI requests."""

    include_usage: bool = False


class JsonSchemaFormat(APIModel):
    """``response_format.json_schema``: a named schema."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(APIModel):
    """OpenAI ``response_format``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(RequestBody):
    """Sampling fields shared by completions and chat (OpenAI names plus vLLM extensions)."""

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    speculative: bool = True  # kvforge: False opts this request out of speculative decoding
    # kvforge: a sampling preset (code, factual, summarize, translate, chat, creative) for the
    # sampling fields this request leaves out
    preset: str | None = None
    priority: int = 0
    cache_salt: str | None = None
    # structured outputs (OpenAI response_format plus the names vLLM / SGLang users send)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    json_schema: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    regex: str | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    ebnf: str | None = None
    guided_choice: list[str] | None = None
    choice: list[str] | None = None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The one constraint this body asks for, or None; conflicting ones raise 400."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
            if schema is None:
                raise InvalidRequestError(
                    "response_format.json_schema.schema is required", "response_format"
                )
            found.append(("response_format", StructuredOutputsParams(json=schema)))
        pairs: list[tuple[str, Any, str]] = [
            ("guided_json", self.guided_json, "json"),
            ("json_schema", self.json_schema, "json"),
            ("guided_regex", self.guided_regex, "regex"),
            ("regex", self.regex, "regex"),
            ("guided_grammar", self.guided_grammar, "grammar"),
            ("grammar", self.grammar, "grammar"),
            ("ebnf", self.ebnf, "grammar"),
            ("guided_choice", self.guided_choice, "choice"),
            ("choice", self.choice, "choice"),
        ]
        for name, value, kind in pairs:
            if value is not None:
                found.append((name, StructuredOutputsParams(**{kind: value})))
        if len(found) > 1:
            names = [name for name, _ in found]
            raise InvalidRequestError(
                f"give only one structured output constraint, got {names}", names[1]
            )
        return found[0][1] if found else None

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """SamplingParams for this body; invalid values raise InvalidRequestError."""
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError as exc:
            raise InvalidRequestError("logit_bias keys must be token ids", "logit_bias") from exc
        preset = sampling_preset(self.preset).values if self.preset is not None else {}

        def pick(name: str, default: Any) -> Any:
            """The request's own value, else the preset's, else the API default."""
            if name in self.model_fields_set and getattr(self, name) is not None:
                return getattr(self, name)
            return preset.get(name, default)

        params = SamplingParams(
            n=self.n,
            best_of=self.best_of,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            frequency_penalty=pick("frequency_penalty", 0.0),
            presence_penalty=pick("presence_penalty", 0.0),
            logit_bias=bias or None,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            use_beam_search=self.use_beam_search,
            length_penalty=self.length_penalty,
            speculative=self.speculative,
            structured_outputs=self.structured_outputs(),
        )
        return check_num_samples(params)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class FunctionCall(APIModel):
    """The function part of a past tool call: a name and its JSON arguments."""

    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(APIModel):
    """A tool call in an assistant message."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(APIModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content parts joined."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # image parts become markers, their URLs "images"
            message, urls = chat_images(message)
            if urls:
                message["images"] = urls
        elif self.content is None:
            message["content"] = ""
        return message


class ToolChoiceFunction(APIModel):
    """``tool_choice.function``."""

    name: str


class ToolChoice(APIModel):
    """A named ``tool_choice``: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | ToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_template_kwargs(self) -> ChatCompletionRequest:
        reserved = sorted(RESERVED_CHAT_TEMPLATE_KWARGS & (self.chat_template_kwargs or {}).keys())
        if reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {reserved}", "chat_template_kwargs"
            )
        return self

    @property
    def effective_max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token, or None without logprobs."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError("top_logprobs requires logprobs=true", "top_logprobs")
            return None
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError("top_logprobs must be in [0, 20]", "top_logprobs")
        return self.top_logprobs or 0


class ImageURL(APIModel):
    url: str


class EmbeddingPart(APIModel):
    """A text or an image (``image_url.url``: a data URL or bare base64) to embed with CLIP."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class EmbeddingRequest(RequestBody):
    """POST /v1/embeddings (parts: for a CLIP model served with --clip)."""

    input: str | list[str] | list[int] | list[list[int]] | list[EmbeddingPart]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class ClassifyRequest(RequestBody):
    """POST /v1/classify: zero-shot classification of an image by a CLIP model."""

    model: str | None = None
    image: str  # a data URL or bare base64
    labels: list[str] = Field(min_length=1, max_length=1000)
    templates: list[str] | None = Field(default=None, min_length=1, max_length=32)


class TokenizeRequest(RequestBody):
    """POST /tokenize: a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestBody):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class LoadLoRARequest(RequestBody):
    """POST /v1/load_lora_adapter (vLLM's shape, plus an optional scale)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)
    scale: float = Field(default=1.0, allow_inf_nan=False, ge=-100, le=100)


class UnloadLoRARequest(RequestBody):
    """POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=256)


class GenerateRequest(RequestBody):
    """POST /generate in SGLang's native shape."""

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    rid: str | None = None
    lora_path: str | None = Field(default=None, max_length=256)  # a served adapter's name
    # SGLang's logprob fields: log-probabilities of the prompt tokens from logprob_start_len
    # (-1: none) and of the generated ones, with top_logprobs_num alternatives each
    return_logprob: bool = False
    logprob_start_len: int = Field(default=-1, ge=-1)
    top_logprobs_num: int = Field(default=0, ge=0, le=20)

    def to_sampling_params(self) -> SamplingParams:
        """SGLang names (max_new_tokens, stop, ...) to SamplingParams."""
        sp = dict(self.sampling_params)
        preset = sp.pop("preset", None)  # kvforge: a sampling preset for the fields left out
        if preset is not None:
            if not isinstance(preset, str):
                raise InvalidRequestError("sampling_params.preset must be a name", "preset")
            for key, value in sampling_preset(preset).values.items():
                sp.setdefault(key, value)
        known = {
            "max_new_tokens": "max_tokens",
            "temperature": "temperature",
            "top_p": "top_p",
            "top_k": "top_k",
            "min_p": "min_p",
            "stop": "stop",
            "stop_token_ids": "stop_token_ids",
            "frequency_penalty": "frequency_penalty",
            "presence_penalty": "presence_penalty",
            "repetition_penalty": "repetition_penalty",
            "min_new_tokens": "min_tokens",
            "ignore_eos": "ignore_eos",
            "n": "n",
            "seed": "seed",
            "skip_special_tokens": "skip_special_tokens",
            "speculative": "speculative",
        }
        constraints = {
            "json_schema": "json",
            "regex": "regex",
            "ebnf": "grammar",
            "choice": "choice",
        }
        given = {constraints[k]: sp.pop(k) for k in list(sp) if k in constraints}
        structured = StructuredOutputsParams(**given) if given else None
        unknown = set(sp) - set(known)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling_params: {sorted(unknown)}", "sampling_params"
            )
        kwargs = {known[k]: v for k, v in sp.items()}
        kwargs.setdefault("max_tokens", 128)
        if kwargs.get("top_k") == -1:
            kwargs["top_k"] = 0
        kwargs["structured_outputs"] = structured
        if self.return_logprob:
            kwargs["logprobs"] = self.top_logprobs_num
            if self.logprob_start_len >= 0:
                kwargs["prompt_logprobs"] = self.top_logprobs_num
        return check_num_samples(SamplingParams(**kwargs))
