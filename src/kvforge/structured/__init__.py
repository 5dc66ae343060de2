"""Structured output: grammar backend interface, compile cache, xgrammar backend."""

from kvforge.structured.backend import (
    BaseGrammarBackend,
    BaseGrammarMatcher,
    GrammarCache,
    StructuredOutputManager,
    create_grammar_backend,
)

__all__ = [
    "BaseGrammarBackend",
    "BaseGrammarMatcher",
    "GrammarCache",
    "StructuredOutputManager",
    "create_grammar_backend",
]
