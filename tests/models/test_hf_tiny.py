"""Tiny random checkpoints of each family: HF-directory loading matches transformers."""

from __future__ import annotations

import pytest
import torch

from kvforge.config import ModelConfig
from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.layers.attention import create_attention_backend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache
from kvforge.loader import load_model
from kvforge.runner import ModelRunner
from kvforge.sampling_params import SamplingParams
from tests.helpers import run_to_completion
from tests.models.tiny_checkpoints import VOCAB, write_checkpoint

pytest.importorskip("transformers")

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3"]
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = write_checkpoint(request.param, directory)
    loaded = load_model(ModelConfig(model=str(directory)), create_attention_backend(), False)
    return directory, reference, loaded


def kv_caches(cfg, num_blocks, block_size=4):
    cpu = torch.device("cpu")
    return [
        PagedKVCache.allocate(
            num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32, cpu
        )
        for _ in range(cfg.num_layers)
    ]


def test_logits_match_transformers(checkpoint):
    _, reference, loaded = checkpoint
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (40,)).tolist()  # longer than the sliding windows (8)
    cfg = loaded.config
    # Prefill the first 23 tokens, then the rest in a second chunk over the paged cache.
    kv = kv_caches(cfg, 12)
    blocks = list(range(10))
    with torch.inference_mode():
        first = loaded.model(
            ForwardBatch.build([ids[:23]], [0], [blocks], 4, torch.device("cpu")), kv
        )
        second = loaded.model(
            ForwardBatch.build([ids[23:]], [23], [blocks], 4, torch.device("cpu")), kv
        )
        ours = loaded.model.compute_logits(torch.cat([first, second]))
        ref = reference(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= LOGIT_TOLERANCE


def test_engine_greedy_matches_transformers(checkpoint):
    directory, reference, loaded = checkpoint
    config = engine_config(str(directory), block_size=4, num_blocks=64, show_progress=False)
    engine = LLMEngine(config, ModelRunner(config, loaded))
    prompts = [[0, 5, 9, 17, 33], [0, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = run_to_completion(engine, engine.kv_cache_manager.check_integrity)
    for request_id, prompt in zip(ids, prompts):
        tokens = list(prompt)
        with torch.inference_mode():
            for _ in range(12):
                tokens.append(int(reference(torch.tensor([tokens])).logits[0, -1].argmax()))
        assert outputs[request_id].outputs[0].token_ids == tokens[len(prompt) :]


def test_tokenizer_and_chat_template_from_directory(checkpoint):
    _, _, loaded = checkpoint
    tok = loaded.tokenizer
    assert tok.encode("w5 w6") == [0, 5, 6]
    assert tok.eos_token_ids == [1]
    ids = tok.encode_chat([{"role": "user", "content": "w7"}])
    assert ids == [0, 3, 7, 4]
    assert tok.decode(ids) == "user w7 assistant"
