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
    """About 512 greedy tokens over the benchmark chat prompts, and the reference log-probs."""
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
    return seqs, _reference(runner, seqs)


def _reference(runner, seqs):  # type: ignore[no-untyped-def]
    """Log-probabilities at the generated positions on the float32 KV path."""
    return [runner.score(p + g)[len(p) - 1 : len(p) + len(g) - 1].log_softmax(-1) for p, g in seqs]


@pytest.mark.parametrize(
    ("kv_cache_dtype", "calculate", "recent", "minimum", "max_kld"),
    [
        ("int8", True, None, 0.99, 0.0002),
        ("fp8_e4m3", True, None, 0.99, 0.0005),
        ("fp8_e4m3", False, None, 0.99, 0.0005),
        ("fp8_e5m2", True, None, 0.98, 0.002),
        ("fp8_e4m3", False, 0, 0.93, 0.02),  # one-byte values only: no exact recent blocks
    ],
)
def test_greedy_agreement_with_float_kv(
    smollm, smollm_path, generated, kv_cache_dtype, calculate, recent, minimum, max_kld
):
    """Teacher-forced one token per step, so every token reads its context back from the
    cache as decoding does (calculated scales settle over the first steps)."""
    seqs, reference = generated
    config = engine_config(
        smollm_path,
        num_blocks=256,
        show_progress=False,
        kv_cache_dtype=kv_cache_dtype,
        calculate_kv_scales=calculate,
        kv_cache_recent_blocks=recent,
    )
    logits = ModelRunner(config, smollm).score_many([p + g for p, g in seqs], chunk_size=1)
    same, kld, total = 0, 0.0, 0
    for (prompt, gen), ref, out in zip(seqs, reference, logits):
        ours = out[len(prompt) - 1 : len(prompt) + len(gen) - 1].log_softmax(-1)
        same += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        kld += float((ref.exp() * (ref - ours)).sum())
        total += len(gen)
    print(
        f"{kv_cache_dtype} (calculated scales: {calculate}, recent blocks: {recent}): "
        f"top-1 {same / total:.4f}, mean KLD {kld / total:.5f} over {total} tokens"
    )
    assert same / total >= minimum
    assert kld / total <= max_kld


@pytest.mark.parametrize(
    ("kv_cache_dtype", "recent", "ratio"),
    [
        ("fp8_e4m3", 0, 2.0),
        ("fp8_e5m2", 0, 2.0),
        ("fp8_e4m3", None, 1.96),  # the exact recent copies take 1/64 of the memory
        ("int8", 0, 1.93),  # a float16 scale per token and head
        ("int8", None, 1.9),
    ],
)
def test_blocks_at_equal_memory(smollm_packed, smollm_path, kv_cache_dtype, recent, ratio):
    """Blocks in the same KV memory against the default path's bf16 cache."""

    def blocks(**kwargs):  # type: ignore[no-untyped-def]
        config = engine_config(smollm_path, kv_cache_memory="256MiB", show_progress=False, **kwargs)
        return ModelRunner(config, smollm_packed).num_blocks

    bf16 = blocks()
    ours = blocks(kv_cache_dtype=kv_cache_dtype, kv_cache_recent_blocks=recent)
    print(f"{kv_cache_dtype} (recent blocks: {recent}): {ours / bf16:.3f}x the blocks of bf16")
    assert ours >= ratio * bf16


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
