"""Gemma 3 270M Q4_K_M (K-quants, sliding window, QK-norm, GeGLU) against transformers."""

from __future__ import annotations

import pytest

from kvforge.config import ModelConfig
from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.layers.attention import create_attention_backend
from kvforge.loader import load_model
from kvforge.runner import ModelRunner
from kvforge.sampling_params import SamplingParams
from tests.helpers import load_transformers_gguf, run_to_completion
from tests.models.test_smollm_reference import hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
]
NUM_TOKENS = 24


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    return load_transformers_gguf(gemma_path)


def test_gemma3_greedy_matches_transformers(gemma_path, hf_gemma):
    model, hf_tokenizer = hf_gemma
    loaded = load_model(ModelConfig(model=gemma_path), create_attention_backend(), False)
    assert loaded.config.sliding_layers.count(False) == 3  # layers 5, 11, 17 attend globally
    config = engine_config(gemma_path, num_blocks=64, show_progress=False)
    engine = LLMEngine(config, ModelRunner(config, loaded))
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    prompt_ids = [loaded.tokenizer.encode(p) for p in PROMPTS]
    for prompt, ids in zip(PROMPTS, prompt_ids):
        assert ids == hf_tokenizer.encode(prompt)  # BOS + SentencePiece pieces
    request_ids = [engine.add_request(ids, params) for ids in prompt_ids]
    outputs = run_to_completion(engine)
    for request_id, ids in zip(request_ids, prompt_ids):
        tokens = outputs[request_id].outputs[0].token_ids
        assert tokens == hf_greedy(model, ids, NUM_TOKENS)
        assert outputs[request_id].outputs[0].text == loaded.tokenizer.decode(tokens)
