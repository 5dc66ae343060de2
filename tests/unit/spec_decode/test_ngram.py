"""N-gram prompt lookup: longest match first, latest occurrence, loops extended, incremental."""

from __future__ import annotations

import random

import pytest

from kvforge.request import Request
from kvforge.sampling_params import SamplingParams
from kvforge.spec_decode import NgramProposer, SpecDecodeStats


def request(prompt: list[int]) -> Request:
    return Request("r", prompt, SamplingParams())


def brute_force(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition: the longest suffix with an earlier occurrence, its latest one."""
    end = len(tokens)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        suffix = tokens[end - n :]
        for start in range(end - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                seq = list(tokens)
                for i in range(k):
                    seq.append(seq[start + n + i])
                return seq[end:]
    return []


def test_proposes_what_followed_the_longest_match():
    proposer = NgramProposer(1, 3)
    #              0  1  2  3  4  5  6  7  8
    r = request([5, 6, 7, 8, 9, 1, 6, 7])
    # suffix (6, 7) occurred at 1..2, followed by 8, 9, 1
    assert proposer.propose(r, 3) == [8, 9, 1]
    assert proposer.propose(r, 0) == []


def test_latest_occurrence_wins_and_loops_extend():
    proposer = NgramProposer(1, 2)
    r = request([1, 2, 3, 1, 2, 4, 1, 2])
    assert proposer.propose(r, 2) == [4, 1]  # the later (1, 2) was followed by 4
    loop = request([7, 8, 7, 8])
    # (7, 8) occurred at 0..1, followed by 7, 8, then the loop goes on: 7, 8, 7
    assert proposer.propose(loop, 5) == [7, 8, 7, 8, 7]


def test_no_match_proposes_nothing():
    assert NgramProposer(2, 3).propose(request([1, 2, 3, 4]), 4) == []
    assert NgramProposer(1, 1).propose(request([9]), 4) == []


def test_incremental_index_equals_brute_force():
    rng = random.Random(0)
    for trial in range(30):
        min_n, max_n = rng.randint(1, 2), rng.randint(2, 4)
        proposer = NgramProposer(min_n, max_n)
        r = request([rng.randrange(6) for _ in range(rng.randint(1, 12))])
        for _ in range(25):
            k = rng.randint(1, 5)
            tokens = r.prompt_token_ids + r.output_token_ids
            assert proposer.propose(r, k) == brute_force(tokens, min_n, max_n, k), trial
            r.output_token_ids.extend(rng.randrange(6) for _ in range(rng.randint(1, 3)))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        NgramProposer(3, 2)
    with pytest.raises(ValueError):
        NgramProposer(0, 2)


def test_stats_per_position():
    stats = SpecDecodeStats(3)
    stats.record(3, 1)
    stats.record(2, 2)
    assert stats.num_draft_tokens == 5 and stats.num_accepted_tokens == 3
    assert stats.position_rates() == [1.0, 0.5, 0.0]
    assert stats.acceptance_rate == pytest.approx(0.6)
    assert stats.mean_accepted_length == pytest.approx(2.5)
