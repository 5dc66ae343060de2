"""EngineArgs is the one definition of the engine options: CLI flags, LLM keywords, configs."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from kvforge.engine_args import EngineArgs
from kvforge.entrypoints.cli import build_parser
from kvforge.errors import InvalidRequestError


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_every_option_is_a_flag_with_the_same_default(command: str) -> None:
    argv = [command, "-p", "hello"] if command == "generate" else [command]
    args = build_parser().parse_args(argv)
    assert EngineArgs.from_cli_args(args) == EngineArgs()


def test_flags_reach_the_engine_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    args = build_parser().parse_args(
        [
            "serve",
            "--seed",
            "7",
            "--device",
            "cuda:1",
            "--scheduling-policy",
            "priority",
            "--no-enable-chunked-prefill",
            "--long-prefill-token-threshold",
            "64",
            "--quantization-asymmetric",
            "--kv-cache-memory",
            "1GiB",
            "--attention-backend",
            "torch_ref",
            "--chat-template",
            str(template),
        ]
    )
    config = EngineArgs.from_cli_args(args).create_engine_config()
    model, cache, sched = config.model_config, config.cache_config, config.scheduler_config
    assert (model.seed, model.device, model.attention_backend) == (7, "cuda:1", "torch_ref")
    assert model.quantization_symmetric is False
    assert model.chat_template == "{{ messages[0]['content'] }}"
    assert cache.kv_cache_memory == 1 << 30
    assert sched.policy == "priority" and sched.enable_chunked_prefill is False
    assert sched.long_prefill_token_threshold == 64


def test_llm_keywords_are_the_fields() -> None:
    from kvforge.entrypoints.llm import engine_config

    names = [f.name for f in dataclasses.fields(EngineArgs) if f.name != "model"]
    config = engine_config(None, **{name: getattr(EngineArgs(), name) for name in names})
    assert config == EngineArgs().create_engine_config()
    with pytest.raises(TypeError):
        engine_config(None, no_such_option=1)


def test_bad_device_is_a_typed_error() -> None:
    with pytest.raises(InvalidRequestError, match="device"):
        EngineArgs(device="tpu").create_engine_config()


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _all_parsers(child)
    return found


def test_every_command_renders_its_help() -> None:
    """argparse %-formats help text: a bare percent sign in one option broke ``--help``."""
    parsers = _all_parsers(build_parser())
    assert len(parsers) > 10
    for parser in parsers:
        assert "usage:" in parser.format_help()


@pytest.mark.parametrize(
    "flags",
    [
        {"speculative_method": "medusa"},
        {"speculative_method": "ngram", "num_speculative_tokens": 0},
        {"speculative_method": "ngram", "num_speculative_tokens": 10_000},
        {"speculative_method": "ngram", "ngram_prompt_lookup_min": 3, "ngram_prompt_lookup_max": 2},
        {"speculative_method": "ngram", "speculative_disable_by_batch_size": -1},
    ],
)
def test_bad_speculative_options_are_refused(flags):
    config = EngineArgs(**flags).create_engine_config()
    with pytest.raises(InvalidRequestError):
        config.speculative_config.check()


def test_speculative_flags_parse():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(
        [
            "--speculative-method",
            "ngram",
            "--num-speculative-tokens",
            "3",
            "--ngram-prompt-lookup-max",
            "6",
        ]
    )
    spec = EngineArgs.from_cli_args(args).create_engine_config().speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.ngram_prompt_lookup_max) == (
        "ngram",
        3,
        6,
    )
    assert spec.enabled
