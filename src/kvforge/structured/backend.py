"""Grammar backend interface, a bounded compile cache, and the per-engine manager."""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

from kvforge.errors import InvalidRequestError
from kvforge.sampling_params import StructuredOutputsParams

_BACKENDS = {"xgrammar": "kvforge.structured.xgrammar_backend:XGrammarBackend"}


class BaseGrammarMatcher(ABC):
    """The state of one request within its grammar."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one generated token; False if the grammar rejects it."""

    @abstractmethod
    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, bit = token)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar accepted its stop token."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (draft tokens checked ahead)."""


class BaseGrammarBackend(ABC):
    """Compiles constraints for one tokenizer and makes matchers from compiled grammars."""

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """Compile a constraint; invalid or unsupported ones raise InvalidRequestError."""

    @abstractmethod
    def matcher(self, compiled: Any) -> BaseGrammarMatcher:
        """A fresh matcher at the start of the grammar."""

    @staticmethod
    def size_of(compiled: Any) -> int:
        """Bytes a compiled grammar holds (for the cache bound)."""
        return 1


class GrammarCache:
    """LRU of compiled grammars bounded by entry count and bytes; thread-safe."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 512 << 20) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.num_compiles = 0

    def get_or_compile(self, params: StructuredOutputsParams, backend: BaseGrammarBackend) -> Any:
        """The cached grammar for ``params``, compiling (outside the lock) on a miss."""
        key = params.key()
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        compiled = backend.compile(params)
        size = backend.size_of(compiled)
        with self._lock:
            self.num_compiles += 1
            if key not in self._entries:
                self._entries[key] = (compiled, size)
                self._bytes += size
            while len(self._entries) > self.max_entries or (
                self._bytes > self.max_bytes and len(self._entries) > 1
            ):
                _, (_, old_size) = self._entries.popitem(last=False)
                self._bytes -= old_size
        return compiled

    def __len__(self) -> int:
        return len(self._entries)


class StructuredOutputManager:
    """The engine's entry point: compile (cached) and create matchers."""

    def __init__(self, backend: BaseGrammarBackend, cache: GrammarCache | None = None) -> None:
        self.backend = backend
        self.cache = cache or GrammarCache()

    def compile(self, params: StructuredOutputsParams) -> Any:
        """Compile or fetch from the cache (safe from any thread)."""
        return self.cache.get_or_compile(params, self.backend)

    def matcher(self, params: StructuredOutputsParams) -> BaseGrammarMatcher:
        """A matcher for a new request."""
        return self.backend.matcher(self.compile(params))

    def check_satisfiable(self, params: StructuredOutputsParams, vocab_size: int) -> None:
        """Raise InvalidRequestError when the constraint allows no first token at all (a
        grammar that matches nothing), before the request is admitted."""
        matcher = self.matcher(params)
        if matcher.is_terminated():
            return
        bitmask = new_bitmask(1, vocab_size)
        matcher.fill_bitmask(bitmask, 0)
        if not bool(bitmask.any()):
            raise InvalidRequestError(
                f"the {params.kind} constraint cannot be satisfied: it allows no output",
                params.kind,
            )


def new_bitmask(rows: int, vocab_size: int) -> Any:
    """An int32 bitmask [rows, ceil(V / 32)] with every token allowed (torch, imported here so
    the scheduler does not import it)."""
    import torch

    return torch.full((rows, -(-vocab_size // 32)), -1, dtype=torch.int32)


def create_grammar_backend(name: str, tokenizer: Any, vocab_size: int) -> BaseGrammarBackend:
    """Instantiate a registered backend (imported only now)."""
    if name not in _BACKENDS:
        raise InvalidRequestError(f"unknown grammar backend {name!r}; known: {sorted(_BACKENDS)}")
    module_name, class_name = _BACKENDS[name].split(":")
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    return backend_cls(tokenizer, vocab_size)
