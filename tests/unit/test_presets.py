"""Scenario presets: a request's preset fills the sampling fields it leaves out, explicit
fields win, unknown names are refused with the valid ones; serving presets fill the options
the command line leaves at their defaults; the table gives every value a reason."""

from __future__ import annotations

import pytest

from kvforge import presets
from kvforge.entrypoints.cli import _apply_preset, build_parser
from kvforge.entrypoints.openai.protocol import ChatCompletionRequest
from kvforge.errors import InvalidRequestError

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("name", list(presets.SAMPLING))
def test_a_preset_sets_its_values(name):
    body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "preset": name})
    params = body.sampling_params(16, None)
    for key, value in presets.SAMPLING[name].values.items():
        assert getattr(params, key) == value, key


def test_explicit_fields_win():
    body = ChatCompletionRequest.model_validate(
        {"messages": MESSAGES, "preset": "creative", "temperature": 0.0, "top_p": 0.5}
    )
    params = body.sampling_params(16, None)
    assert (params.temperature, params.top_p) == (0.0, 0.5)
    assert params.repetition_penalty == presets.SAMPLING["creative"].values["repetition_penalty"]
    plain = ChatCompletionRequest.model_validate({"messages": MESSAGES}).sampling_params(16, None)
    assert (plain.temperature, plain.top_p, plain.repetition_penalty) == (1.0, 1.0, 1.0)


def test_unknown_presets_are_refused_with_the_valid_names():
    body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "preset": "fast"})
    with pytest.raises(InvalidRequestError, match="valid presets: code, factual"):
        body.sampling_params(16, None)
    with pytest.raises(InvalidRequestError, match="low-latency"):
        presets.find("nope")


def test_serving_presets_fill_options_left_at_defaults():
    parser = build_parser()
    args = parser.parse_args(["serve", "--preset", "low-latency", "--max-num-seqs", "8"])
    assert _apply_preset(args, parser) is None
    assert args.max_num_seqs == 8  # given on the command line: kept
    assert args.max_num_batched_tokens == 1024 and args.long_prefill_token_threshold == 256
    args = parser.parse_args(["serve", "--preset", "chat"])
    assert _apply_preset(args, parser) == "chat"  # a sampling preset: the request default


def test_every_value_has_a_reason():
    text = presets.table()
    for preset in [*presets.SAMPLING.values(), *presets.SERVING.values()]:
        assert preset.values.keys() == preset.reasons.keys()
        assert preset.name in text


def test_generate_takes_a_preset():
    from kvforge.entrypoints.openai.protocol import GenerateRequest

    body = GenerateRequest.model_validate(
        {"text": "hi", "sampling_params": {"preset": "chat", "temperature": 0.2}}
    )
    params = body.to_sampling_params()
    assert params.temperature == 0.2  # explicit wins
    assert params.top_p == presets.SAMPLING["chat"].values["top_p"]
    with pytest.raises(InvalidRequestError, match="valid presets"):
        GenerateRequest.model_validate(
            {"text": "hi", "sampling_params": {"preset": "nope"}}
        ).to_sampling_params()
