"""SamplingParams refuses every malformed value with a typed error naming the field."""

from __future__ import annotations

import pytest

from kvforge.errors import InvalidRequestError
from kvforge.sampling_params import SamplingParams

BAD = [
    ("n", None),
    ("n", 2.0),
    ("n", True),
    ("top_k", None),
    ("top_k", -2),
    ("min_tokens", None),
    ("max_tokens", "3"),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("logprobs", 21),
    ("prompt_logprobs", 21),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", 10**400),
    ("temperature", True),
    ("top_p", "0.5"),
    ("repetition_penalty", float("nan")),
    ("length_penalty", 1e300),
    ("stop", 5),
    ("stop", ["x" * 2000]),
    ("stop", ["a"] * 100),
    ("stop_token_ids", [1.5]),
    ("stop_token_ids", list(range(2000))),
    ("logit_bias", {1: float("nan")}),
    ("logit_bias", {"1": 1.0}),
    ("ignore_eos", 1),
    ("structured_outputs", "json"),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={str(v)[:20]}" for f, v in BAD])
def test_bad_values_raise_typed_errors(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert "\n" not in str(info.value)


def test_beam_width_is_bounded_by_the_logprobs_limit():
    SamplingParams(n=10, use_beam_search=True)
    with pytest.raises(InvalidRequestError, match="beam width"):
        SamplingParams(n=11, use_beam_search=True)


def test_edge_values_are_accepted():
    for seed in (0, 2**64 - 1, -(2**63)):
        assert SamplingParams(seed=seed).seed == seed
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0).is_greedy
    SamplingParams(logprobs=20, prompt_logprobs=20, logit_bias={5: -100, 6: 100})


def test_check_catches_fields_changed_after_construction():
    params = SamplingParams()
    params.temperature = float("nan")
    with pytest.raises(InvalidRequestError, match="temperature"):
        params.check()
