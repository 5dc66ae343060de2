"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

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


def load_transformers_gguf(path: str) -> tuple[Any, Any]:
    """transformers' own float32 model and tokenizer for a GGUF file (the reference)."""
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model.eval(), tokenizer
