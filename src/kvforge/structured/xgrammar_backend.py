"""The default grammar backend: xgrammar (JSON schema, regex, EBNF / GBNF, choice)."""

from __future__ import annotations

import json
from typing import Any

import torch
import xgrammar as xgr

from kvforge.errors import InvalidRequestError
from kvforge.sampling_params import StructuredOutputsParams
from kvforge.structured.backend import BaseGrammarBackend, BaseGrammarMatcher
from kvforge.structured.gbnf import normalize_gbnf
from kvforge.structured.schema_check import check_json_schema
from kvforge.utils import sanitize_message


def _vocab_type(tokenizer: Any) -> xgr.VocabType:
    decoder = repr(tokenizer.backend.decoder)
    if "ByteLevel" in decoder:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in decoder:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _choice_grammar(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class XGrammarMatcher(BaseGrammarMatcher):
    """Wraps ``xgrammar.GrammarMatcher``."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        """See BaseGrammarMatcher."""
        return bool(self._matcher.accept_token(token_id))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """See BaseGrammarMatcher."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        """See BaseGrammarMatcher."""
        return bool(self._matcher.is_terminated())

    def rollback(self, num_tokens: int) -> None:
        """See BaseGrammarMatcher."""
        if num_tokens:
            self._matcher.rollback(num_tokens)


class XGrammarBackend(BaseGrammarBackend):
    """Compiles constraints against the model's vocabulary with xgrammar."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        backend = tokenizer.backend
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        # Special tokens get an empty spelling so no grammar can ever produce them as text;
        # stop tokens are handled by xgrammar separately.
        vocab = ["" if i in special else (backend.id_to_token(i) or "") for i in range(vocab_size)]
        info = xgr.TokenizerInfo(
            vocab,
            _vocab_type(tokenizer),
            vocab_size=vocab_size,
            stop_token_ids=list(tokenizer.eos_token_ids),
            add_prefix_space=_vocab_type(tokenizer) == xgr.VocabType.BYTE_FALLBACK
            and tokenizer.backend.normalizer is not None
            and "Prepend" in repr(tokenizer.backend.normalizer),
        )
        # Our own GrammarCache bounds memory; xgrammar's cache would be a second copy.
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab_size = vocab_size

    def compile(self, params: StructuredOutputsParams) -> Any:
        """See BaseGrammarBackend."""
        try:
            if params.json_object:
                # OpenAI's json_object mode means a JSON object, not any JSON value.
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=True)
            if params.json is not None:
                schema = json.loads(params.json) if isinstance(params.json, str) else params.json
                check_json_schema(schema)
                return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            if params.regex is not None:
                return self.compiler.compile_regex(params.regex)
            if params.grammar is not None:
                return self.compiler.compile_grammar(normalize_gbnf(params.grammar))
            assert params.choice is not None
            return self.compiler.compile_grammar(_choice_grammar(params.choice))
        except InvalidRequestError:
            raise
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"the JSON schema is not valid JSON: {exc}", "json_schema"
            ) from exc
        except RecursionError as exc:
            raise InvalidRequestError(
                f"the {params.kind} constraint is nested too deeply", params.kind
            ) from exc
        except (RuntimeError, ValueError, TypeError) as exc:
            message = sanitize_message(str(exc)) if str(exc).strip() else type(exc).__name__
            raise InvalidRequestError(
                f"invalid {params.kind} constraint: {message}", params.kind
            ) from exc

    def matcher(self, compiled: Any) -> BaseGrammarMatcher:
        """See BaseGrammarBackend."""
        return XGrammarMatcher(xgr.GrammarMatcher(compiled))

    @staticmethod
    def size_of(compiled: Any) -> int:
        """See BaseGrammarBackend."""
        return int(compiled.memory_size_bytes)
