"""Incremental detokenization, stop strings and sandboxed chat templates."""

from __future__ import annotations

import pytest

from kvforge.errors import InvalidRequestError
from kvforge.tokenizer import IncrementalDetokenizer
from kvforge.tokenizer.chat_template import render_chat_template

TEXT = "Héllo wörld! 你好，世界 🤖🚀 naïve café — done."


def stream(tokenizer, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_token_id or 0], **kwargs)
    seen = []
    for token_id in ids:
        stopped = detok.add_token(token_id)
        seen.append(detok.output_text)
        if stopped:
            break
    return detok, seen


def test_never_emits_half_a_character(smollm):
    tok = smollm.tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok, seen = stream(tok, ids)
    assert all("\ufffd" not in text for text in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only grows
    assert detok.final_text == tok.decode(ids) == TEXT


def test_stop_string_across_token_boundaries(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("The answer is forty-two, said the computer.", add_special_tokens=False)
    stop = "y-tw"  # spans several tokens
    detok, seen = stream(tok, ids, stop=[stop])
    assert detok.stop_reason == stop
    assert detok.final_text == "The answer is fort"
    assert all(stop not in text for text in seen)
    detok, _ = stream(tok, ids, stop=[stop, "answer"], include_stop_str_in_output=True)
    assert detok.final_text == "The answer"


def test_chat_template_is_sandboxed():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidRequestError):
        render_chat_template(evil, [{"role": "user", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="empty"):
        render_chat_template("{{ messages }}", [])
    with pytest.raises(InvalidRequestError, match="boom"):
        render_chat_template("{{ raise_exception('boom') }}", [{"role": "user", "content": "x"}])


def test_embedded_chat_template_renders_turns(smollm):
    text = smollm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>system\nBe terse.<|im_end|>" in text
