"""The frontend language on the in-process engine with the embedded model: the seed programs,
select against a direct computation of normalised log-probabilities, fork sharing the cached
prefix, constrained gen."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.lang import assistant, function, gen, user
from kvforge.lang.runtime import Engine
from tests.lang_seed import multi_turn_qa, tool_use


@pytest.fixture(scope="module")
def engine():
    backend = Engine(kv_cache_memory="256MiB")
    yield backend
    backend.shutdown()


def test_multi_turn_qa_answers_as_the_chat_api(engine):
    state = multi_turn_qa.run(
        "What is the capital of France?", "And of Italy?", backend=engine, temperature=0
    )
    llm = LLM(kv_cache_memory="64MiB", show_progress=False)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    greedy = SamplingParams(max_tokens=256, temperature=0)
    first = llm.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
    assert state["answer_1"] == first
    messages += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert state["answer_2"] == llm.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
    assert state.messages()[-1] == {"role": "assistant", "content": state["answer_2"]}
    assert state.meta["cached_tokens"] > 0  # the second turn extends the first's prompt


def test_select_matches_normalised_log_probabilities(engine):
    state = tool_use.run("What is 3 * 7 in math", backend=engine, temperature=0)
    assert state["tool"] in ("calculator", "search engine")
    prefix = "To answer this question: What is 3 * 7 in math. I need to use a "
    tokenizer = engine.tokenizer
    head = tokenizer.encode(prefix)
    direct = []
    for choice in ("calculator", "search engine"):
        ids = tokenizer.encode(prefix + choice)
        shared = (
            next(i for i, (a, b) in enumerate(zip(head, ids)) if a != b)
            if ids[: len(head)] != head
            else len(head)
        )
        logits = engine.llm.call(lambda e, ids=ids: e.runner.score(ids))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        tail = [logprobs[i - 1, ids[i]].item() for i in range(shared, len(ids))]
        direct.append(sum(tail) / len(tail))
    expected = ("calculator", "search engine")[max(range(2), key=direct.__getitem__)]
    assert state["tool"] == expected


def test_fork_branches_find_the_prefix_cached(engine):
    @function
    def branches(s):
        s += "Here is a long shared introduction about caches and programs. " * 4
        forks = s.fork(4)
        for i, branch in enumerate(forks):
            branch += f"Point {i}:" + gen("point", max_tokens=8)
        forks.join()

    state = branches.run(backend=engine, temperature=0)
    assert len(state["point"]) == 4
    # the prefix is computed once before the branches start together (each finds it cached);
    # the parent's counts include that request and the branches'
    branch_meta = [branch.meta for branch in state._branches]
    assert all(m["cached_tokens"] > 0.5 * m["prompt_tokens"] for m in branch_meta)
    assert state.cached_ratio() > 0.7


def test_streamed_run_gives_the_same_text_in_pieces(engine):
    args = ("What is the capital of France?", "And of Italy?")
    whole = multi_turn_qa.run(*args, backend=engine, temperature=0)
    state = multi_turn_qa.run(*args, backend=engine, temperature=0, stream=True)
    answer = list(state.text_iter("answer_2"))
    pieces = list(state.text_iter())
    assert len(answer) > 1 and "".join(answer) == whole["answer_2"]
    assert "".join(pieces) == whole.text() == state.text()


def test_constrained_gen(engine):
    @function
    def constrained(s):
        s += user("Give a date and a JSON record.")
        s += assistant("Date: " + gen("date", regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"))

    state = constrained.run(backend=engine, temperature=0)
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", state["date"])

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "year": {"type": "integer"}},
        "required": ["city", "year"],
        "additionalProperties": False,
    }

    @function
    def record(s):
        s += user("A city and a year, as JSON.")
        s += assistant(gen("record", json_schema=schema, max_tokens=48))

    value = json.loads(record.run(backend=engine, temperature=0)["record"])
    assert set(value) == {"city", "year"} and isinstance(value["year"], int)


@pytest.mark.slow  # starts a server
def test_http_backend_gives_the_in_process_results(engine, tmp_path):
    """The seed programs over a server's /generate (RuntimeEndpoint) and in process: the same
    greedy variables and text."""
    from kvforge.lang.runtime import RuntimeEndpoint
    from tests.server.conftest import start_server, stop_server

    handle = start_server(tmp_path)
    try:
        remote = RuntimeEndpoint(handle.url)
        assert remote.markers == engine.markers
        for question in ("What is 3 * 7 in math", "Who wrote Hamlet"):
            here = tool_use.run(question, backend=engine, temperature=0)
            there = tool_use.run(question, backend=remote, temperature=0)
            assert (here.variables, here.text()) == (there.variables, there.text())
        args = ("What is the capital of France?", "And of Italy?")
        here = multi_turn_qa.run(*args, backend=engine, temperature=0)
        there = multi_turn_qa.run(*args, backend=remote, temperature=0)
        assert (here.variables, here.text()) == (there.variables, there.text())
        assert there.meta["cached_tokens"] > 0
        streamed = multi_turn_qa.run(*args, backend=remote, temperature=0, stream=True)
        assert len(list(streamed.text_iter("answer_1"))) > 1
        assert "".join(streamed.text_iter()) == here.text()
        # the OpenAI-compatible endpoint: chat turns as messages, plain text as completions
        from kvforge.lang.runtime import OpenAI

        openai = OpenAI(f"{handle.url}/v1", "SmolLM2-135M-Instruct")
        chat = multi_turn_qa.run(*args, backend=openai, temperature=0)
        assert (chat["answer_1"], chat["answer_2"]) == (here["answer_1"], here["answer_2"])
        assert chat.messages() == here.messages()
        streamed = multi_turn_qa.run(*args, backend=openai, temperature=0, stream=True)
        assert len(list(streamed.text_iter("answer_2"))) > 1
        assert streamed["answer_2"] == here["answer_2"] and streamed.meta["prompt_tokens"] > 0
        plain = tool_use.run("What is 3 * 7 in math", backend=openai, temperature=0)
        assert plain["tool"] in ("calculator", "search engine")
        assert ("expression" in plain.variables) == (plain["tool"] == "calculator")
        # /generate's logprob fields, as select uses them
        ids = remote._tokenize("The capital of France is Paris", True)
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 2, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": 3,
            "top_logprobs_num": 2,
        }
        meta = remote._post("/generate", body)["meta_info"]
        assert [t for _, t, _ in meta["input_token_logprobs"]] == ids[3:]
        assert all(lp <= 0 for lp, _, _ in meta["input_token_logprobs"])
        assert (
            len(meta["output_token_logprobs"]) == 2
            and len(meta["input_top_logprobs"]) == len(ids) - 3
        )
    finally:
        stop_server(handle)


def test_continuations_extend_the_previous_token_ids(engine):
    """A prompt that extends a produced text reuses its token ids (generated ids included), so
    the next request starts with exactly the tokens the cache holds."""

    @function
    def counting(s):
        s += "Count with me: one, two, three," + gen("more", max_tokens=6)

    state = counting.run(backend=engine, temperature=0)
    produced = engine.encode(state.text())
    follow_up = engine.encode(state.text() + " Then stop.")
    assert follow_up[: len(produced)] == produced and len(follow_up) > len(produced)
    prompt_ids = engine.encode("Count with me: one, two, three,")
    assert produced[: len(prompt_ids)] == prompt_ids  # the generated ids follow the prompt's
