"""Rejection sampling of draft tokens keeps the target distribution (chi-square, 20k samples)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kvforge.sample import Sampler, SamplingMetadata
from kvforge.sample.rejection import RejectionSampler
from kvforge.sampling_params import SamplingParams

VOCAB = 32
SAMPLES = 20_000


def metadata(params: list[SamplingParams], outputs: list[list[int]]) -> SamplingMetadata:
    return SamplingMetadata.build(
        params, [[1, 2]] * len(params), outputs, [[]] * len(params), {}, VOCAB, torch.device("cpu")
    )


def chi_square_p(observed: Counter, probs: torch.Tensor, total: int) -> float:
    """p-value of observed counts against ``probs`` (cells with expectation < 5 pooled)."""
    expected = probs * total
    big = expected >= 5
    obs = torch.tensor([observed.get(i, 0) for i in range(len(probs))], dtype=torch.float64)
    cells_obs = torch.cat([obs[big], obs[~big].sum(-1, keepdim=True)])
    cells_exp = torch.cat([expected[big], expected[~big].sum(-1, keepdim=True)])
    keep = cells_exp > 0
    assert bool((cells_obs[~keep] == 0).all()), "a token of zero probability was sampled"
    stat = ((cells_obs[keep] - cells_exp[keep]) ** 2 / cells_exp[keep]).sum()
    dof = int(keep.sum()) - 1
    assert dof >= 2, "the test distribution is too peaked"
    return float(torch.special.gammaincc(torch.tensor(dof / 2), stat / 2))


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=20),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, frequency_penalty=0.5),
]


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "top_p", "top_k", "mixed"])
def test_first_and_second_token_follow_the_target(params):
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 0.7  # flat enough that top-p keeps several tokens
    target = Sampler.probs(
        Sampler.process(logits, metadata([params] * 3, [[4], [4, 7], [4, 7, 9]])),
        metadata([params] * 3, [[4], [4, 7], [4, 7, 9]]),
    )
    # Drafts: a likely token, then an unlikely one, so both accept and reject paths run.
    d0 = int(target[0].argmax())
    d1 = int(target[1].argsort()[-3])
    drafts = [d0, d1]
    rows = [[4], [4, d0], [4, d0, d1]]
    target = Sampler.probs(
        Sampler.process(logits, metadata([params] * 3, rows)), metadata([params] * 3, rows)
    )
    md = metadata([params] * 3 * SAMPLES, rows * SAMPLES)
    results = RejectionSampler()(
        logits.repeat(SAMPLES, 1), md, [drafts] * SAMPLES, [None] * SAMPLES, [None] * SAMPLES
    )
    first = Counter(r.token_ids[0] for r in results)
    second = Counter(r.token_ids[1] for r in results if r.token_ids[0] == d0)
    assert chi_square_p(first, target[0].double(), SAMPLES) > 0.01
    assert chi_square_p(second, target[1].double(), first[d0]) > 0.01
    third = Counter(r.token_ids[2] for r in results if r.token_ids[:2] == drafts)
    assert sum(third.values()) > 100
    assert chi_square_p(third, target[2].double(), sum(third.values())) > 0.01
    for r in results:  # kept tokens: accepted drafts, then one of the target's
        assert 1 <= len(r.token_ids) <= 3 and r.token_ids[:-1] == drafts[: len(r.token_ids) - 1]


def test_greedy_accepts_the_argmax_prefix_and_corrects():
    logits = torch.full((4, VOCAB), -5.0)
    for row, best in enumerate([3, 8, 5, 11]):
        logits[row, best] = 5.0
    params = SamplingParams(temperature=0)
    sampler = RejectionSampler()
    md = metadata([params] * 4, [[], [3], [3, 8], [3, 8, 6]])
    (out,) = sampler(logits, md, [[3, 8, 6]], [None], [2])
    assert out.token_ids == [3, 8, 5]  # 6 rejected: the argmax 5 replaces it
    assert out.ranks == [1, 1, 1] and len(out.top[0]) == 2 and out.top[0][0][0] == 3
    raw = logits.log_softmax(-1)
    assert out.logprobs == pytest.approx([raw[0, 3].item(), raw[1, 8].item(), raw[2, 5].item()])
    (out,) = sampler(logits, md, [[3, 8, 5]], [None], [None])
    assert out.token_ids == [3, 8, 5, 11]  # all accepted, plus the bonus token


def test_seeded_verification_is_reproducible():
    logits = torch.randn(3, VOCAB)
    params = SamplingParams(temperature=1.0, seed=7)
    md = metadata([params] * 3, [[], [1], [1, 2]])

    def run() -> list[int]:
        generator = torch.Generator().manual_seed(7)
        return [
            RejectionSampler()(logits, md, [[1, 2]], [generator], [None])[0].token_ids[0]
            for _ in range(20)
        ]

    assert run() == run()
