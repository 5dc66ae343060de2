"""The embedded GGUF model against transformers loading the same file in float32."""

from __future__ import annotations

import pytest
import torch

from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache
from kvforge.sampling_params import SamplingParams
from tests.helpers import CHAT_PROMPTS, load_transformers_gguf, run_to_completion

# Achieved on this model: 0.0 (identical dequantized weights and float32 maths); allowed 1e-3.
LOGIT_TOLERANCE = 1e-3
NUM_TOKENS = 64


@pytest.fixture(scope="module")
def hf_model(smollm_path):
    return load_transformers_gguf(smollm_path)


@pytest.fixture(scope="module")
def prompt_ids(smollm):
    return [smollm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]


def test_tokenizer_and_chat_template_match_transformers(smollm, hf_model, prompt_ids):
    _, hf_tokenizer = hf_model
    for prompt, ids in zip(CHAT_PROMPTS, prompt_ids):
        expected = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(expected, dict) or hasattr(expected, "keys"):
            expected = expected["input_ids"]
        assert ids == list(expected)
    text = "Hello world! Numbers 12345 and ünïcödé 🤖."
    assert smollm.tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)


def test_prompt_logits_match(smollm, hf_model, prompt_ids):
    model, _ = hf_model
    cfg = smollm.config
    worst = 0.0
    for ids in prompt_ids:
        blocks = list(range((len(ids) + 15) // 16))
        kv = [
            PagedKVCache.allocate(
                len(blocks), 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu")
            )
            for _ in range(cfg.num_layers)
        ]
        batch = ForwardBatch.build([ids], [0], [blocks], 16, torch.device("cpu"))
        with torch.inference_mode():
            ours = smollm.model.compute_logits(smollm.model(batch, kv))
            ref = model(torch.tensor([ids])).logits[0]
        worst = max(worst, (ours - ref).abs().max().item())
    print(f"max |delta logit| over {len(prompt_ids)} prompts: {worst:.2e}")
    assert worst <= LOGIT_TOLERANCE


def test_greedy_generation_is_token_identical(make_engine, hf_model, prompt_ids):
    model, _ = hf_model
    engine = make_engine(num_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompt_ids]
    outputs = run_to_completion(engine)
    for request_id, prompt in zip(ids, prompt_ids):
        assert outputs[request_id].outputs[0].token_ids == hf_greedy(model, prompt, NUM_TOKENS)


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding with transformers' KV cache, never stopping at EOS."""
    tokens: list[int] = []
    past = None
    step_input = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(num_tokens):
            out = model(step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            step_input = torch.tensor([[tokens[-1]]])
    return tokens
