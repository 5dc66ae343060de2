"""The kvforge command line."""

from __future__ import annotations

import subprocess
import sys

from kvforge.entrypoints.cli import build_parser, run_chat
from kvforge.sampling_params import SamplingParams


def test_generate_command_runs_the_embedded_model():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvforge.entrypoints.cli",
            "generate",
            "--chat",
            "-p",
            "What is the capital of France?",
            "--max-tokens",
            "12",
            "--kv-cache-memory",
            "64MiB",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "KV cache" in result.stderr  # start-up log reports the KV budget


def test_generate_command_reports_bad_input():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvforge.entrypoints.cli",
            "generate",
            "-p",
            "hi",
            "--top-p",
            "7",
            "--kv-cache-memory",
            "16MiB",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "top_p" in result.stderr


def _reader(lines: list[str]):  # type: ignore[no-untyped-def]
    """A ``read`` for the chat loop that gives ``lines`` in turn, then end of input."""
    remaining = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_reuses_the_prefix_cache_between_turns(make_engine):
    engine = make_engine()
    read = _reader(["What is the capital of France?", "And of Italy?"])

    written: list[str] = []
    turns = run_chat(
        engine, SamplingParams(temperature=0, max_tokens=24), read=read, write=written.append
    )
    assert len(turns) == 2
    assert "Paris" in turns[0].outputs[0].text
    # The second turn's prompt starts with the whole first exchange: most of it is cached.
    assert turns[1].num_cached_tokens >= (len(turns[0].prompt_token_ids) // 16) * 16
    assert "".join(written).startswith(turns[0].outputs[0].text)


def test_parser_knows_the_subcommands():
    args = build_parser().parse_args(["generate", "-p", "x", "-n", "2", "--temperature", "0.5"])
    assert args.n == 2 and args.temperature == 0.5 and args.model is None


def test_chat_commands(make_engine, tmp_path):
    """/system, /preset, /save, /help and multi-line input in the chat loop."""
    import json

    engine = make_engine()
    saved = tmp_path / "chat.json"
    read = _reader(
        [
            "/help",
            "/system You answer in one word.",
            "/preset turbo",
            "/preset factual",
            "Name a colour \\",
            "of the sky.",
            f"/save {saved}",
            "/save",
        ]
    )

    written: list[str] = []
    turns = run_chat(
        engine, SamplingParams(temperature=1.0, max_tokens=8), read=read, write=written.append
    )
    text = "".join(written)
    assert "/preset NAME" in text and "system prompt set" in text
    assert "unknown preset 'turbo'" in text and "preset factual" in text
    assert len(turns) == 1
    conversation = json.loads(saved.read_text())
    assert conversation[0] == {"role": "system", "content": "You answer in one word."}
    assert conversation[1] == {"role": "user", "content": "Name a colour \nof the sky."}
    assert conversation[2]["role"] == "assistant" and "usage: /save FILE" in text
