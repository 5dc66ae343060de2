"""The same engine on a CUDA device: logits and greedy outputs match the CPU reference."""

from __future__ import annotations

import pytest
import torch

from kvforge.config import ModelConfig
from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.layers.attention import create_attention_backend
from kvforge.loader import load_model
from kvforge.runner import ModelRunner
from kvforge.sampling_params import SamplingParams
from tests.helpers import run_to_completion
from tests.models.tiny_checkpoints import write_checkpoint

pytestmark = pytest.mark.cuda
pytest.importorskip("transformers")


def engine_on(directory, device: str) -> LLMEngine:
    loaded = load_model(
        ModelConfig(model=str(directory), device=device), create_attention_backend(), False
    )
    config = engine_config(
        str(directory), device=device, block_size=4, num_blocks=128, show_progress=False
    )
    return LLMEngine(config, ModelRunner(config, loaded))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_cuda_matches_cpu(tmp_path, arch):
    reference = write_checkpoint(arch, tmp_path)
    prompts = [[0, 5, 9, 17, 33], [0, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]
    results = {}
    for device in ("cpu", "cuda"):
        engine = engine_on(tmp_path, device)
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        ids = [engine.add_request(p, greedy) for p in prompts]
        seeded = engine.add_request(
            prompts[0], SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=6, ignore_eos=True)
        )
        beam = engine.add_request(
            prompts[1], SamplingParams(n=2, use_beam_search=True, max_tokens=5)
        )
        outputs = run_to_completion(engine, engine.kv_cache_manager.check_integrity)
        assert engine.kv_cache_manager.pool.num_in_use == 0
        results[device] = (
            [outputs[i].outputs[0].token_ids for i in ids],
            len(outputs[seeded].outputs),
            [o.token_ids for o in outputs[beam].outputs],
        )
    assert results["cuda"][0] == results["cpu"][0]
    assert results["cuda"][1] == 3
    assert results["cuda"][2] == results["cpu"][2]
    with torch.inference_mode():
        tokens = list(prompts[0])
        for _ in range(12):
            tokens.append(int(reference(torch.tensor([tokens])).logits[0, -1].argmax()))
    assert results["cuda"][0][0] == tokens[len(prompts[0]) :]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8_e4m3"])
def test_cuda_packed_weights_and_kv_match_cpu(smollm_path, kv_cache_dtype):
    """Packed GGUF weights (tiled int8 path on CUDA) and one-byte KV agree with the CPU."""
    ids = list(range(1000, 1200))
    logits = {}
    for device in ("cpu", "cuda"):
        config = engine_config(
            smollm_path,
            device=device,
            num_blocks=32,
            kv_cache_dtype=kv_cache_dtype,
            calculate_kv_scales=True,
            show_progress=False,
        )
        logits[device] = ModelRunner(config).score(ids).float().cpu().log_softmax(-1)
    kld = (logits["cpu"].exp() * (logits["cpu"] - logits["cuda"])).sum(-1).mean()
    assert kld < 0.01
