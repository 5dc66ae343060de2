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
    loaded = load_model(
        ModelConfig(model=gemma_path, dtype="float32"), create_attention_backend(), False
    )
    assert loaded.config.sliding_layers.count(False) == 3  # layers 5, 11, 17 attend globally
    config = engine_config(gemma_path, num_blocks=64, show_progress=False)
    engine = LLMEngine(config, ModelRunner(config, loaded))
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    prompt_ids = [loaded.tokenizer.encode(p) for p in PROMPTS]
    for prompt, ids in zip(PROMPTS, prompt_ids):
        assert ids == hf_tokenizer.encode(prompt)  # BOS + SentencePiece pieces
    spaced = "def f(x):\n    return  x\n\n\nprint(f(1))   # done"
    assert loaded.tokenizer.encode(spaced) == hf_tokenizer.encode(spaced)  # whitespace pieces
    request_ids = [engine.add_request(ids, params) for ids in prompt_ids]
    outputs = run_to_completion(engine)
    for request_id, ids in zip(request_ids, prompt_ids):
        tokens = outputs[request_id].outputs[0].token_ids
        assert tokens == hf_greedy(model, ids, NUM_TOKENS)
        assert outputs[request_id].outputs[0].text == loaded.tokenizer.decode(tokens)


def test_gemma3_packed_weights_agree_with_float32(gemma_path):
    """Q4_K, Q5_0, Q6_K and Q8_0 kept packed against the dequantized float32 reference."""
    import torch

    from kvforge.tools.text import machine_text

    backend = create_attention_backend()
    runners = {}
    for dtype in ("float32", "auto"):
        loaded = load_model(ModelConfig(model=gemma_path, dtype=dtype), backend, False)
        config = engine_config(gemma_path, num_blocks=32, show_progress=False)
        runners[dtype] = ModelRunner(config, loaded)
    ids = runners["float32"].loaded.tokenizer.encode(machine_text(min_chars=4000))[:512]
    chunks = [ids[:256], ids[256:]]
    base = torch.cat([runners["float32"].score(c).log_softmax(-1) for c in chunks])
    packed = torch.cat([runners["auto"].score(c).log_softmax(-1) for c in chunks])
    kld = float((base.exp() * (base - packed)).sum(-1).mean())
    top1 = float((base.argmax(-1) == packed.argmax(-1)).float().mean())
    print(f"Gemma packed vs float32: top-1 {top1:.4f}, KLD {kld:.5f}")
    assert top1 >= 0.97
    assert kld <= 0.01
