"""One-byte KV caches (fp8 e4m3 / e5m2, int8) against the float32 KV path."""

from __future__ import annotations

import pytest

from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.runner import ModelRunner
from kvforge.sampling_params import SamplingParams
from tests.helpers import CHAT_PROMPTS, run_to_completion


@pytest.fixture(scope="module")
def generated(smollm, smollm_path):
    """About 512 greedy tokens over the benchmark chat prompts, and the reference's top-1."""
    config = engine_config(smollm_path, num_blocks=256, show_progress=False)
    runner = ModelRunner(config, smollm)
    engine = LLMEngine(config, runner)
    prompts = [*CHAT_PROMPTS, *(f"Write a short story about {t}." for t in ("a robot", "the moon"))]
    for prompt in prompts:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=128))
    seqs = [
        (o.prompt_token_ids, list(o.outputs[0].token_ids))
        for o in run_to_completion(engine).values()
    ]
    assert sum(len(g) for _, g in seqs) >= 512
    return seqs, _top1(runner, seqs)


def _top1(runner, seqs):  # type: ignore[no-untyped-def]
    return [runner.score(p + g)[len(p) - 1 : len(p) + len(g) - 1].argmax(-1) for p, g in seqs]


@pytest.mark.parametrize(
    ("kv_cache_dtype", "calculate", "minimum"),
    [
        ("int8", True, 0.99),
        ("fp8_e4m3", True, 0.96),
        ("fp8_e4m3", False, 0.93),
        ("fp8_e5m2", True, 0.88),
    ],
)
def test_greedy_agreement_with_float_kv(
    smollm, smollm_path, generated, kv_cache_dtype, calculate, minimum
):
    seqs, reference = generated
    config = engine_config(
        smollm_path,
        num_blocks=256,
        show_progress=False,
        kv_cache_dtype=kv_cache_dtype,
        calculate_kv_scales=calculate,
    )
    ours = _top1(ModelRunner(config, smollm), seqs)
    same = sum(int((a == b).sum()) for a, b in zip(ours, reference))
    total = sum(len(b) for b in reference)
    print(
        f"{kv_cache_dtype} (calculated scales: {calculate}): top-1 {same / total:.4f} over {total} tokens"
    )
    assert same / total >= minimum


@pytest.mark.parametrize(
    ("kv_cache_dtype", "ratio"), [("fp8_e4m3", 2.0), ("fp8_e5m2", 2.0), ("int8", 1.9)]
)
def test_blocks_at_equal_memory(smollm, smollm_path, kv_cache_dtype, ratio):
    def blocks(**kwargs):  # type: ignore[no-untyped-def]
        config = engine_config(smollm_path, kv_cache_memory="32MiB", show_progress=False, **kwargs)
        return ModelRunner(config, smollm).num_blocks

    sixteen_bit = blocks() / 2  # the float32 reference path holds half of bf16's blocks
    assert blocks(kv_cache_dtype=kv_cache_dtype) >= ratio * sixteen_bit


def test_engine_serves_with_int8_kv_and_preemption(make_engine):
    """Prefix sharing, copy-on-write forks and preemption work on a quantized cache."""
    engine = make_engine(kv_cache_dtype="int8", num_blocks=24)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": CHAT_PROMPTS[0]}])
    params = SamplingParams(temperature=0, max_tokens=40, n=3)
    for _ in range(3):
        engine.add_request(prompt, params)
    outputs = run_to_completion(engine, engine.kv_cache_manager.check_integrity)
    assert all(len(c.token_ids) > 0 for o in outputs.values() for c in o.outputs)
    texts = {c.text for o in outputs.values() for c in o.outputs}
    assert len(texts) == 1  # greedy: every sample of every request agrees
    assert engine.kv_cache_manager.num_available_blocks == 24
