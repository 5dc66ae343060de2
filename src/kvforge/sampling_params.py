"""SamplingParams: what the caller asks of one request's generation (OpenAI / vLLM names)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvforge.errors import InvalidRequestError

_GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint on the generated text: a JSON schema, any JSON object, a regex,
    an EBNF / GBNF grammar, or a choice among strings."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("json", "regex", "grammar", "choice")
            if getattr(self, name) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise InvalidRequestError(
                f"structured outputs need exactly one of json, json_object, regex, grammar, "
                f"choice; got {given or 'none'}",
                "structured_outputs",
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise InvalidRequestError(
                "choice must be a non-empty list of non-empty strings", "choice"
            )

    @property
    def kind(self) -> str:
        """Which constraint this is."""
        if self.json_object:
            return "json_object"
        return next(
            n for n in ("json", "regex", "grammar", "choice") if getattr(self, n) is not None
        )

    def key(self) -> tuple[str, str]:
        """A hashable identity for compile caches."""
        value = getattr(self, self.kind) if self.kind != "json_object" else ""
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        return (self.kind, str(value))


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of a request, named and meant as in vLLM / OpenAI.

    ``temperature=0`` is greedy. ``n`` samples (or ``n`` beams with ``use_beam_search``) are
    returned; ``best_of`` samples are drawn and the ``n`` with the highest cumulative logprob
    kept. ``logprobs`` asks for the sampled token's logprob plus that many top alternatives.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    structured_outputs: StructuredOutputsParams | None = None
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop or [])
        if self.top_k < 0:  # vLLM accepts -1 for "no top-k"
            self.top_k = 0
        self.validate()

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature < _GREEDY_EPS

    @property
    def num_samples(self) -> int:
        """How many sequences are generated: ``best_of`` if set, else ``n``."""
        return self.best_of if self.best_of is not None else self.n

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` naming the first invalid field."""

        def fail(param: str, why: str) -> None:
            raise InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param)

        if self.n < 1:
            fail("n", "must be at least 1")
        if self.best_of is not None and self.best_of < self.n:
            fail("best_of", f"must be >= n ({self.n})")
        if self.temperature < 0:
            fail("temperature", "must be non-negative")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be positive")
        if not -2 <= self.frequency_penalty <= 2:
            fail("frequency_penalty", "must be in [-2, 2]")
        if not -2 <= self.presence_penalty <= 2:
            fail("presence_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            fail("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            fail("logprobs", "must be non-negative")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            fail("prompt_logprobs", "must be non-negative")
        if any(not s for s in self.stop_list):
            fail("stop", "must not contain empty strings")
        if self.logit_bias is not None:
            for token_id, bias in self.logit_bias.items():
                if not -100 <= bias <= 100:
                    raise InvalidRequestError(
                        f"logit_bias for token {token_id} must be in [-100, 100], got {bias}",
                        "logit_bias",
                    )
        if self.use_beam_search:
            if self.temperature != 0 and not self.is_greedy:
                # Beam search is deterministic; vLLM ignores temperature there, we insist.
                self.temperature = 0.0
            if self.best_of is not None and self.best_of != self.n:
                fail("best_of", "is not supported with beam search; use n as the beam width")
            if self.structured_outputs is not None:
                raise InvalidRequestError(
                    "structured outputs are not supported with beam search", "use_beam_search"
                )

    def validate_vocab(self, vocab_size: int) -> None:
        """Check token ids in the parameters against the model's vocabulary."""
        for token_id in list(self.logit_bias or {}) + list(self.stop_token_ids or []):
            if not 0 <= int(token_id) < vocab_size:
                raise InvalidRequestError(
                    f"token id {token_id} is out of range for a vocabulary of {vocab_size}",
                    "logit_bias" if token_id in (self.logit_bias or {}) else "stop_token_ids",
                )
