"""Beam search on the paged engine equals a naive full-recompute beam search."""

from __future__ import annotations

import pytest
import torch

from kvforge.beam_search import beam_score
from kvforge.config import ModelConfig
from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.layers.attention import create_attention_backend
from kvforge.loader import load_model
from kvforge.runner import ModelRunner
from kvforge.sampling_params import SamplingParams
from tests.helpers import run_to_completion
from tests.models.tiny_checkpoints import write_checkpoint

pytest.importorskip("transformers")
EOS = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("beam")
    reference = write_checkpoint("llama", directory, seed=11)
    loaded = load_model(ModelConfig(model=str(directory)), create_attention_backend(), False)
    config = engine_config(str(directory), block_size=4, num_blocks=128, show_progress=False)
    return LLMEngine(config, ModelRunner(config, loaded)), reference


def score(tokens: list[int], cumulative: float, length_penalty: float) -> float:
    return beam_score(len(tokens) - (tokens[-1] == EOS), cumulative, length_penalty)


def naive_beam_search(model, prompt, width, max_tokens, length_penalty):
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    completed: list[tuple[list[int], float]] = []
    while beams:
        candidates = []
        for tokens, cumulative in beams:
            with torch.inference_mode():
                logprobs = model(torch.tensor([prompt + tokens])).logits[0, -1].log_softmax(-1)
            values, ids = logprobs.topk(2 * width)
            for value, token in zip(values.tolist(), ids.tolist()):
                candidates.append((tokens + [token], cumulative + value))
        candidates.sort(key=lambda c: -score(c[0], c[1], length_penalty))
        beams = []
        for tokens, cumulative in candidates[:width]:
            if tokens[-1] == EOS or len(tokens) >= max_tokens:
                completed.append((tokens, cumulative))
            else:
                beams.append((tokens, cumulative))
    completed.sort(key=lambda c: -score(c[0], c[1], length_penalty))
    return completed[:width]


@pytest.mark.parametrize("width,length_penalty", [(2, 1.0), (3, 0.5), (4, 1.5)])
def test_beam_search_equals_naive_reference(tiny, width, length_penalty):
    engine, reference = tiny
    prompts = [[0, 7, 8, 9], [0, 20, 21, 22, 23, 24, 25, 26, 27, 28]]
    params = SamplingParams(
        n=width, use_beam_search=True, max_tokens=7, length_penalty=length_penalty
    )
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = run_to_completion(engine, engine.kv_cache_manager.check_integrity)
    assert engine.kv_cache_manager.pool.num_in_use == 0
    for request_id, prompt in zip(ids, prompts):
        got = outputs[request_id].outputs
        expected = naive_beam_search(reference, prompt, width, 7, length_penalty)
        assert [o.token_ids for o in got] == [tokens for tokens, _ in expected]
        for o, (_, cumulative) in zip(got, expected):
            assert o.cumulative_logprob == pytest.approx(cumulative, abs=1e-4)
        scores = [score(o.token_ids, o.cumulative_logprob, length_penalty) for o in got]
        assert scores == sorted(scores, reverse=True)


def test_beam_search_on_embedded_model_orders_by_score(make_engine):
    engine = make_engine()
    params = SamplingParams(n=3, use_beam_search=True, max_tokens=8)
    engine.add_request("The best way to learn a language is", params, request_id="b")
    out = run_to_completion(engine, engine.kv_cache_manager.check_integrity)["b"]
    assert len(out.outputs) == 3
    eos = set(engine.tokenizer.eos_token_ids)
    lengths = [len(o.token_ids) - (o.token_ids[-1] in eos) for o in out.outputs]
    scores = [beam_score(n, o.cumulative_logprob, 1.0) for n, o in zip(lengths, out.outputs)]
    assert scores == sorted(scores, reverse=True)
    assert all(o.text for o in out.outputs)
    assert engine.kv_cache_manager.pool.num_in_use == 0
