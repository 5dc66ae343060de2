"""Hostile-user tests of the frontend language over scripted backends (no model): bugs found by
attacking the interpreter and the HTTP backends, and behaviours verified to be right.

Every probe that could hang runs in a thread joined with a timeout, so a hang fails the test
instead of stopping the suite."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import httpx
import pytest

from kvforge.lang import (
    Completion,
    ProgramError,
    assistant,
    function,
    gen,
    select,
    user,
)
from tests.unit.test_lang import Gated, Scripted


def _within(fn, timeout: float = 5.0) -> dict[str, Any]:
    """Run ``fn`` in a thread: {"value": ...}, {"error": ...} or {"hang": True}."""
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return {"hang": True}
    return result


# ----------------------------------------------------------------------------- bugs


def test_streamed_state_variable_read_waits_for_the_program():
    """BUG: with run(stream=True) the state comes back at once; reading a variable the program
    has not reached yet raises KeyError instead of waiting for it (the run is not over)."""
    backend = Gated(threading.Event())

    @function
    def two_steps(s):
        s += "a" + gen("first")
        s["first"]  # the program waits here while the backend is gated
        s += gen("second")

    state = two_steps.run(backend=backend, stream=True)
    time.sleep(0.1)
    reader = {}
    thread = threading.Thread(target=lambda: reader.update(_within(lambda: state["second"])))
    thread.start()
    time.sleep(0.2)
    backend.gate.set()
    thread.join(10)
    assert "error" not in reader, f"state['second'] raised {reader.get('error')!r}"
    assert reader.get("value") == "abc"


def test_joining_twice_does_not_count_tokens_twice():
    """BUG: a second join adds the branches' token counts to the parent again (the variables
    are not gathered twice, but meta is)."""

    @function
    def twice(s):
        forks = s.fork(2)
        forks += gen("x")
        forks.join()
        after_one = dict(s.meta)
        with contextlib.suppress(ProgramError, ValueError, RuntimeError):
            forks.join()  # refusing a second join is fine too
        return after_one

    state = twice.run(backend=Scripted())
    assert state.meta == state.ret_value
    assert len(state["x"]) == 2


@pytest.mark.parametrize("build", [lambda: select("x", "yes"), lambda: gen("x", choices="yes")])
def test_a_string_is_not_accepted_as_the_list_of_choices(build):
    """BUG: select("x", "yes") silently becomes the choices ["y", "e", "s"]."""
    with pytest.raises((ValueError, TypeError)):
        build()


def test_a_failure_in_a_nested_fork_is_reported():
    """BUG: a branch of a branch that fails is never reported (a failing branch of the
    program's own fork is), so the run succeeds as if nothing happened."""

    @function
    def nested(s):
        outer = s.fork(1)
        inner = outer[0].fork(1)
        inner[0] += "explode " + gen("a")
        outer.join()

    outcome = _within(lambda: nested.run(backend=Scripted()))
    assert isinstance(outcome.get("error"), ProgramError), outcome


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_streamed_program_that_exits_ends_its_stream():
    """BUG: a streamed program that raises a BaseException (SystemExit here) never ends its
    state: text_iter() and every reader then wait forever."""

    @function
    def exits(s):
        s += "partial"
        raise SystemExit(3)

    state = exits.run(backend=Scripted(), stream=True)
    outcome = _within(lambda: "".join(state.text_iter()), timeout=3)
    assert not outcome.get("hang"), "text_iter() hangs after the program died"


def test_text_iter_of_a_variable_generated_twice_is_not_garbled():
    """BUG: text_iter(name) over two gens into the same variable measures the second gen's text
    against what it showed of the first, so it yields the first text plus a tail of the second
    ("hello world" + "LMNOPQRST") - a string that is neither value."""

    class Streams(Scripted):
        texts = ["hello world", "ABCDEFGHIJKLMNOPQRST"]

        def generate(self, prompt, sampling, messages, on_text=None):
            text = self.texts[len(self.prompts)]
            self.prompts.append(prompt)
            for end in range(1, len(text) + 1):
                if on_text is not None:
                    on_text(text[:end])
                time.sleep(0.002)
            return Completion(text, 1, len(text), 0)

    @function
    def twice(s):
        s += gen("x") + " / " + gen("x")

    state = twice.run(backend=Streams(), stream=True)
    streamed = "".join(state.text_iter("x"))
    # the variable's next gen, streamed whole: one of its values, never a mix of two
    assert streamed in ("hello world", "ABCDEFGHIJKLMNOPQRST"), streamed


class _FakeOpenAI:
    """An OpenAI-compatible endpoint in memory (httpx MockTransport); records request bodies."""

    def __init__(self, stream_done: bool = True) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.stream_done = stream_done

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        chat = request.url.path.endswith("/chat/completions")
        if body.get("stream"):
            events = [
                {"choices": [{"index": 0, "delta": {"content": piece}, "text": piece}]}
                for piece in ("Hel", "lo")
            ]
            data = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
            if self.stream_done:
                data += "data: [DONE]\n\n"
            return httpx.Response(
                200, content=data.encode(), headers={"content-type": "text/event-stream"}
            )
        choice = {"message": {"content": "ok"}} if chat else {"text": "ok"}
        return httpx.Response(200, json={"choices": [choice], "usage": {"prompt_tokens": 3}})


def _openai(endpoint: _FakeOpenAI):
    from kvforge.lang.runtime import OpenAI

    backend = OpenAI("http://fake/v1", "m")
    backend.client = httpx.Client(
        base_url="http://fake/v1", transport=httpx.MockTransport(endpoint)
    )
    return backend


def test_openai_backend_does_not_drop_text_outside_chat_turns():
    """BUG: with chat turns, the OpenAI backend sends only the turns as messages; text appended
    outside them (before the first turn, between turns) silently never reaches the model,
    although it is in the state's text. It should be sent or refused."""
    endpoint = _FakeOpenAI()

    @function
    def context_first(s):
        s += "IMPORTANT CONTEXT. "
        s += user("question")
        s += "Between turns. "
        s += assistant(gen("a"))

    outcome = _within(lambda: context_first.run(backend=_openai(endpoint)))
    if "error" in outcome:  # refusing such a program is acceptable
        assert isinstance(outcome["error"], ProgramError)
        return
    sent = json.dumps(endpoint.bodies[-1]["messages"])
    assert "IMPORTANT CONTEXT" in sent and "Between turns" in sent, sent


def test_openai_stream_cut_short_is_an_error():
    """BUG: a streamed OpenAI reply that ends without [DONE] (the server died or a proxy cut it)
    is taken as the whole answer: the truncated text becomes the variable, no error.
    (RuntimeEndpoint refuses a stream that ends without its result.)"""

    @function
    def streamed(s):
        s += "plain " + gen("a")

    state = streamed.run(backend=_openai(_FakeOpenAI(stream_done=False)), stream=True)
    assert isinstance(state.error(), ProgramError), f"got {state['a']!r} and no error"


# ------------------------------------------------------------ verified behaviours


def test_openai_stream_with_done_and_gen_outside_assistant():
    """A complete stream gives the joined text; a gen outside an assistant turn is refused by
    the chat endpoint with an error naming the line."""
    endpoint = _FakeOpenAI()

    @function
    def streamed(s):
        s += "plain " + gen("a")

    state = streamed.run(backend=_openai(endpoint), stream=True)
    assert "".join(state.text_iter("a")) == "Hello" == state["a"]

    @function
    def outside(s):
        s += user("q")
        s += gen("a")  # no assistant turn

    line = outside.func.__code__.co_firstlineno + 3
    with pytest.raises(ProgramError, match=f":{line}\\).*inside assistant"):
        outside.run(backend=_openai(endpoint))


def test_runtime_endpoint_stream_without_result_is_an_error():
    """/generate's stream that ends before the event holding the result raises."""
    from kvforge.lang.runtime import RuntimeEndpoint, _TokenContinuity

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1, 2]})
        data = 'data: {"text": "par"}\n\n'  # then the connection ends
        return httpx.Response(200, content=data.encode())

    backend = RuntimeEndpoint.__new__(RuntimeEndpoint)
    _TokenContinuity.__init__(backend)
    backend.client = httpx.Client(base_url="http://fake", transport=httpx.MockTransport(handler))
    backend.markers = {r: ("", "") for r in ("system", "user", "assistant")}

    @function
    def streamed(s):
        s += "x" + gen("a")

    state = streamed.run(backend=backend, stream=True)
    with pytest.raises(ProgramError, match="ended (its stream without a result|before its)"):
        "".join(state.text_iter())


def test_reading_a_variable_that_is_never_produced_raises_at_once():
    @function
    def missing(s):
        s += "x" + gen("x")
        return s["nope"]

    outcome = _within(lambda: missing.run(backend=Scripted()))
    assert isinstance(outcome.get("error"), ProgramError), outcome
    assert "KeyError" in str(outcome["error"])

    @function
    def branch_var_before_join(s):
        forks = s.fork(2)
        forks += gen("b")
        return s["b"]  # only the branches make it: not the parent's (yet)

    outcome = _within(lambda: branch_var_before_join.run(backend=Scripted()))
    assert "KeyError" in str(outcome.get("error")), outcome


@pytest.mark.parametrize("count", [0, -1, True, 2.0, "3", None])
def test_fork_refuses_bad_counts(count):
    with pytest.raises(ProgramError, match="positive number of branches"):
        function(lambda s: s.fork(count)).run(backend=Scripted())


def test_fork_of_many_branches():
    @function
    def wide(s):
        s += "x"
        forks = s.fork(300)
        forks += gen("y", max_tokens=1)
        forks.join()
        return len(s["y"])

    assert wide.run(backend=Scripted()).ret_value == 300


@pytest.mark.parametrize("value", [None, 3, 2.5, ["a", "b"], ("a",), b"bytes", {"a": 1}])
def test_appending_non_expressions_is_refused_with_the_line(value):
    @function
    def bad(s):
        s += value

    line = bad.func.__code__.co_firstlineno + 2
    with pytest.raises(ProgramError, match=f":{line}\\): TypeError: cannot append"):
        bad.run(backend=Scripted())


@pytest.mark.parametrize("max_tokens", [0, -5, 1.5, True, "8", None])
def test_gen_refuses_bad_max_tokens(max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        gen("x", max_tokens=max_tokens)


def test_unbalanced_turns_are_refused():
    from kvforge.lang import assistant_end, user_begin

    @function
    def closes_wrong(s):
        s += user_begin() + "q"
        s += assistant_end()

    with pytest.raises(ProgramError, match="no open assistant turn"):
        closes_wrong.run(backend=Scripted())


def test_a_failing_program_in_run_batch_is_reported_after_the_others_finish():
    backend = Scripted()

    @function
    def maybe(s, i):
        s += ("explode " if i == 3 else "ok ") + gen("x")

    outcome = _within(lambda: maybe.run_batch([{"i": i} for i in range(8)], backend=backend))
    assert isinstance(outcome.get("error"), ProgramError), outcome
    assert "the model is on fire" in str(outcome["error"])
    assert len(backend.prompts) == 8  # every program ran


def test_an_exception_in_a_streamed_program_ends_the_stream_with_it():
    @function
    def fails_later(s):
        s += "before " + gen("x")
        s["x"]
        raise ValueError("program bug")

    state = fails_later.run(backend=Scripted(), stream=True)
    line = fails_later.func.__code__.co_firstlineno + 4
    outcome = _within(lambda: "".join(state.text_iter()))
    assert isinstance(outcome.get("error"), ProgramError), outcome
    assert f":{line}): ValueError: program bug" in str(outcome["error"])
    # text_iter of a variable the program never made ends (with the failure) instead of waiting
    assert isinstance(_within(lambda: list(state.text_iter("never"))).get("error"), ProgramError)
    ended = _within(lambda: list(function(lambda s: None).run(backend=Scripted()).text_iter("v")))
    assert ended == {"value": []}


def test_no_thread_leak_over_many_runs():
    @function
    def prog(s, i):
        s += "a" + gen("x")
        forks = s.fork(2)
        forks += gen("y")
        forks.join()
        if i % 3 == 0:
            raise ValueError("every third")

    before = threading.active_count()
    for i in range(200):
        with contextlib.suppress(ProgramError):
            prog.run(i, backend=Scripted())
        state = prog.run(i, backend=Scripted(), stream=True)
        with contextlib.suppress(ProgramError):
            list(state.text_iter())
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before
