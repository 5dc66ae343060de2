"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvforge.engine import LLMEngine

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Romeo and Juliet?",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is a black hole?",
]


def run_to_completion(engine: LLMEngine, check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Step until idle; return final outputs by request id. ``check`` runs after each step."""
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        if check is not None:
            check()
    return finished
