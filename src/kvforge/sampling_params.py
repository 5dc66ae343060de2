"""SamplingParams: what the caller asks of one request's generation (OpenAI / vLLM names)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from kvforge.errors import InvalidRequestError

_GREEDY_EPS = 1e-5
# OpenAI's limit on top alternatives per token.
MAX_LOGPROBS = 20
# Stop strings are checked against the text after every token, token lists every step: bound
# what one request can make the engine thread do.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_TOKEN_ENTRIES = 1024
# Beam scores divide by length ** length_penalty; larger exponents overflow a float.
MAX_LENGTH_PENALTY = 10.0
_INT_FIELDS = (
    "n",
    "best_of",
    "top_k",
    "seed",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
)
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "length_penalty",
)


_OPTIONAL_FIELDS = ("best_of", "seed", "max_tokens", "logprobs", "prompt_logprobs")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    """An int or float that converts to a finite float (no bools, NaN, inf, 10**400)."""
    if not (_is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:
        return False


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
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError("a JSON schema must be an object or a string", "json")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"{name} must be a string", name)
        if self.choice is not None and not isinstance(self.choice, list):
            raise InvalidRequestError("choice must be a list of strings", "choice")
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
    # False: this request decodes without draft tokens when the engine speculates.
    speculative: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop or [])
        if self.top_k == -1:  # vLLM's "no top-k"
            self.top_k = 0
        self.validate()

    def check(self) -> None:
        """Run every check again (after fields were changed since construction)."""
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Strict types: no bools or strings for numbers, no NaN or infinity (values from JSON
        bodies arrive unchecked through /generate and the offline API)."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if (value is not None or name not in _OPTIONAL_FIELDS) and not _is_int(value):
                raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
        for name in _FLOAT_FIELDS:
            if not _is_finite_number(getattr(self, name)):
                raise InvalidRequestError(
                    f"{name} must be a finite number, got {str(getattr(self, name))[:40]}", name
                )
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise InvalidRequestError(
                "structured_outputs must be a StructuredOutputsParams", "structured_outputs"
            )
        for name in (
            "ignore_eos",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "use_beam_search",
            "speculative",
        ):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be a boolean", name)
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(
                isinstance(x, str) for x in self.stop
            ):
                raise InvalidRequestError("stop must be a string or a list of strings", "stop")
            if len(self.stop) > MAX_STOP_STRINGS:
                raise InvalidRequestError(f"stop takes at most {MAX_STOP_STRINGS} strings", "stop")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(len(stop) > MAX_STOP_STRING_CHARS for stop in stops):
            raise InvalidRequestError(
                f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters long", "stop"
            )
        for name in ("stop_token_ids", "logit_bias"):
            value = getattr(self, name)
            if value is not None and hasattr(value, "__len__") and len(value) > MAX_TOKEN_ENTRIES:
                raise InvalidRequestError(f"{name} takes at most {MAX_TOKEN_ENTRIES} entries", name)
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, (list, tuple))
            or not all(_is_int(t) for t in self.stop_token_ids)
        ):
            raise InvalidRequestError("stop_token_ids must be a list of integers", "stop_token_ids")
        if self.logit_bias is not None and (
            not isinstance(self.logit_bias, dict)
            or not all(_is_int(k) and _is_finite_number(v) for k, v in self.logit_bias.items())
        ):
            raise InvalidRequestError(
                "logit_bias must map token ids to finite numbers", "logit_bias"
            )

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
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            fail("seed", "must fit in 64 bits")
        if self.top_k < 0:
            fail("top_k", "must be -1 (off), 0 (off) or positive")
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
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            fail("length_penalty", f"must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}]")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            fail("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            fail("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            fail("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
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
            if self.n > MAX_LOGPROBS // 2:
                # Each beam proposes 2 * width candidates from the top logprobs.
                fail("n", f"is the beam width, at most {MAX_LOGPROBS // 2}")
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
        """Check token ids and top_k in the parameters against the model's vocabulary."""
        if self.top_k > vocab_size:
            raise InvalidRequestError(
                f"top_k must be at most the vocabulary size {vocab_size}, got {self.top_k}",
                "top_k",
            )
        for token_id in list(self.logit_bias or {}) + list(self.stop_token_ids or []):
            if not 0 <= int(token_id) < vocab_size:
                raise InvalidRequestError(
                    f"token id {token_id} is out of range for a vocabulary of {vocab_size}",
                    "logit_bias" if token_id in (self.logit_bias or {}) else "stop_token_ids",
                )
