"""Every sampling parameter against a naive per-row reference on fake logits (vocab 64)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from kvforge.sample import Sampler, SamplingMetadata
from kvforge.sampling_params import SamplingParams

VOCAB = 64


def build(params, prompts=None, outputs=None, banned=None, generators=None):
    rows = len(params)
    return SamplingMetadata.build(
        params,
        prompts or [[1, 2, 3]] * rows,
        outputs or [[4, 4, 5]] * rows,
        banned or [[]] * rows,
        generators or {},
        VOCAB,
        torch.device("cpu"),
    )


def naive_logits(row, p: SamplingParams, prompt, output, banned):
    row = row.clone().tolist()
    if p.repetition_penalty != 1:
        for t in set(prompt) | set(output):
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        row[t] -= p.frequency_penalty * c + p.presence_penalty
    for t, b in (p.logit_bias or {}).items():
        row[t] += b
    for t in banned:
        row[t] = -math.inf
    return row


def naive_probs(row, p: SamplingParams):
    scaled = [x / p.temperature for x in row]
    keep = set(range(VOCAB))
    if p.top_k:
        kth = sorted(scaled, reverse=True)[p.top_k - 1]
        keep = {t for t in keep if scaled[t] >= kth}

    def softmax(ids):
        m = max(scaled[t] for t in ids)
        z = sum(math.exp(scaled[t] - m) for t in ids)
        return {t: math.exp(scaled[t] - m) / z for t in ids}

    if p.top_p < 1:
        probs = softmax(keep)
        nucleus, total = set(), 0.0
        for t in sorted(keep, key=lambda t: -probs[t]):
            if total > p.top_p:
                break
            nucleus.add(t)
            total += probs[t]
        keep = nucleus
    if p.min_p:
        probs = softmax(keep)
        top = max(probs.values())
        keep = {t for t in keep if probs[t] >= p.min_p * top}
    probs = softmax(keep)
    return [probs.get(t, 0.0) for t in range(VOCAB)]


CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.9, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, repetition_penalty=1.5),
    SamplingParams(temperature=1.0, frequency_penalty=1.2),
    SamplingParams(temperature=1.0, presence_penalty=-0.8),
    SamplingParams(temperature=1.0, logit_bias={7: 5.0, 9: -100.0}),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: repr(p)[15:60])
def test_distribution_matches_naive_reference(params):
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 3
    prompts = [[1, 2, 3], [10, 11], [20, 20, 21]]
    outputs = [[4, 4, 5], [12, 12, 12, 13], []]
    md = build([params] * 3, prompts, outputs)
    processed = Sampler.process(logits, md)
    probs = Sampler.probs(processed, md)
    for r in range(3):
        row = naive_logits(logits[r], params, prompts[r], outputs[r], [])
        expected = torch.tensor(naive_probs(row, params))
        torch.testing.assert_close(probs[r], expected, atol=1e-5, rtol=1e-4)


def test_greedy_rows_take_argmax_after_penalties_and_bias():
    logits = torch.randn(2, VOCAB)
    params = [
        SamplingParams(temperature=0, logit_bias={3: 100.0}),
        SamplingParams(temperature=0, repetition_penalty=2.0),
    ]
    out = Sampler()(logits, build(params, [[1], [1]], [[], []]))
    assert out.token_ids[0] == 3
    row = naive_logits(logits[1], params[1], [1], [], [])
    assert out.token_ids[1] == max(range(VOCAB), key=lambda t: row[t])


def test_banned_tokens_are_never_sampled():
    logits = torch.zeros(1, VOCAB)
    logits[0, 0] = 50.0  # an overwhelming EOS
    out = Sampler()(logits, build([SamplingParams(temperature=0)], banned=[[0]]))
    assert out.token_ids[0] != 0


def test_samples_follow_the_distribution():
    torch.manual_seed(1)
    logits = torch.randn(1, VOCAB)
    params = SamplingParams(temperature=0.8, top_k=8)
    md = build([params] * 4000, outputs=[[]] * 4000)
    out = Sampler()(logits.expand(4000, -1).contiguous(), md)
    expected = Sampler.probs(
        Sampler.process(logits, build([params], outputs=[[]])), build([params], outputs=[[]])
    )[0]
    counts = torch.bincount(out.token_ids, minlength=VOCAB).float() / 4000
    assert counts[expected == 0].sum() == 0  # nothing outside top-k
    assert (counts - expected).abs().max() < 0.03


def test_seeded_sampling_is_reproducible_and_batch_independent():
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB)
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def draw(rows, seeded_row):
        gens = {seeded_row: torch.Generator().manual_seed(1234)}
        params = [SamplingParams(temperature=1.0)] * rows
        params[seeded_row] = seeded
        picks = []
        for _ in range(20):
            out = Sampler()(logits[:rows], build(params, outputs=[[]] * rows, generators=gens))
            picks.append(int(out.token_ids[seeded_row]))
        return picks

    alone = draw(1, 0)
    assert alone == draw(1, 0)
    # same logits row in a different batch position
    logits[3] = logits[0]
    assert alone == draw(4, 3)


def test_logprobs_are_raw_and_ranked():
    logits = torch.randn(2, VOCAB)
    out = Sampler()(logits, build([SamplingParams(temperature=0, logprobs=3)] * 2))
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(out.logprobs, raw.max(-1).values)
    assert out.ranks.tolist() == [1, 1]
    assert out.top_token_ids is not None and out.top_token_ids.shape == (2, 3)
    torch.testing.assert_close(out.top_logprobs, raw.topk(3).values)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"min_p": 2},
        {"n": 0},
        {"max_tokens": 0},
        {"best_of": 1, "n": 2},
        {"repetition_penalty": 0},
        {"frequency_penalty": 3},
        {"presence_penalty": -3},
        {"logit_bias": {1: 200}},
        {"min_tokens": 5, "max_tokens": 2},
        {"stop": [""]},
        {"logprobs": -1},
    ],
)
def test_invalid_parameters_raise_a_typed_error(kwargs):
    from kvforge.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param is not None
