"""The frontend language's interpreter over a scripted backend (no model): chat turns, text,
gen / select into variables, concatenation, fork, nested programs, run_batch, errors naming
the program line, and no torch import."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from kvforge.lang import (
    Backend,
    Completion,
    ProgramError,
    function,
    gen,
    select,
    user,
)
from tests.lang_seed import multi_turn_qa, tool_use


class Scripted(Backend):
    """ChatML markers; gen answers with the length of its prompt; select prefers the choice
    named in the prompt, else the last one."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def role_prefix(self, role: str) -> str:
        return f"<|im_start|>{role}\n"

    def role_suffix(self, role: str) -> str:
        return "<|im_end|>\n"

    def generate(self, prompt, sampling, messages, on_text=None):
        self.prompts.append(prompt)
        if "explode" in prompt:
            raise RuntimeError("the model is on fire")
        return Completion(
            f" <{len(prompt)}:{sampling['max_tokens']}>", len(prompt), 3, len(prompt) // 2
        )

    def select(self, prompt, choices, messages):
        self.prompts.append(prompt)
        best = next((i for i, c in enumerate(choices) if c in prompt), len(choices) - 1)
        scores = [0.0 if i == best else -1.0 for i in range(len(choices))]
        return Completion(choices[best], len(prompt), 0, 0, scores)


def test_multi_turn_qa_builds_chat_turns_and_variables():
    backend = Scripted()
    state = multi_turn_qa.run("What is 2+2?", "And 3+3?", backend=backend)
    first = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    first += "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert backend.prompts[0] == first
    assert state["answer_1"] == f" <{len(first)}:256>"
    assert backend.prompts[1].startswith(first + state["answer_1"] + "<|im_end|>\n")
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"] * 1 + [
        "user",
        "assistant",
    ]
    assert state.messages()[2]["content"] == state["answer_1"]
    assert state.text().endswith(state["answer_2"] + "<|im_end|>\n")
    assert state.meta["completion_tokens"] == 6
    assert "".join(state.text_iter()) == state.text()


def test_tool_use_selects_then_generates():
    backend = Scripted()
    state = tool_use.run(question="what is the calculator result of 3 * 7", backend=backend)
    assert state["tool"] == "calculator"
    assert "expression" in state.variables and "word" not in state.variables
    state = tool_use.run(question="who wrote it", backend=backend)
    assert state["tool"] == "search engine" and "word" in state.variables
    assert state.text().startswith("To answer this question: who wrote it. I need to use a ")


def test_fork_branches_share_the_prefix_and_diverge():
    backend = Scripted()

    @function
    def branches(s):
        s += "Shared prefix. "
        forks = s.fork(3)
        for i, branch in enumerate(forks):
            branch += f"Branch {i}: " + gen("out", max_tokens=4)
        forks.join()
        s += "Chosen: " + select("pick", ["Branch 1", "Branch 9"])

    state = branches.run(backend=backend)
    assert all(p.startswith("Shared prefix. Branch ") for p in backend.prompts[:3])
    assert state["pick"] == "Branch 9"  # the branches' text is not the parent's
    # join gathers each branch's new variables into a list, in branch order
    assert state["out"] == [forks_out for forks_out in state["out"]] and len(state["out"]) == 3
    assert all(out.startswith(" <") for out in state["out"])
    assert state.meta["completion_tokens"] == 3 * 3  # the branches' counts join the parent's


def test_nested_programs_and_run_batch_keep_order():
    @function
    def inner(s, word):
        s += "Say " + word + ":" + gen("said", max_tokens=2)

    @function
    def outer(s, word):
        s += user("Hi")
        inner(s, word)
        s += "!"

    states = outer.run_batch([{"word": f"w{i}"} for i in range(20)], backend=Scripted())
    assert [s.text().split("Say ")[1].split(":")[0] for s in states] == [f"w{i}" for i in range(20)]
    assert all(s.text().endswith("!") for s in states)


def test_errors_name_the_program_line():
    @function
    def fails(s):
        s += "fine so far. "
        s += "explode " + gen("x")  # the failing line

    with pytest.raises(
        ProgramError, match=r"fails \(.*test_lang.py:\d+\): RuntimeError: the model"
    ):
        fails.run(backend=Scripted())
    line = fails.func.__code__.co_firstlineno + 3
    with pytest.raises(ProgramError, match=f":{line}\\)"):
        fails.run(backend=Scripted())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: gen("x", max_tokens=0), "max_tokens"),
        (lambda: select("x", []), "non-empty"),
        (lambda: select("x", ["a", 3]), "strings"),
        (lambda: gen("x") + 3, "cannot append int"),
    ],
)
def test_bad_expressions_are_refused(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_turns_must_nest_properly():
    from kvforge.lang import assistant_begin, user_begin

    @function
    def unbalanced(s):
        s += user_begin()
        s += assistant_begin()

    with pytest.raises(ProgramError, match="cannot open inside a user turn"):
        unbalanced.run(backend=Scripted())


class Gated(Scripted):
    """Streams its answer in three pieces; waits at ``gate`` (a barrier of the branches that
    must be generating at the same time, or an event the test sets) before finishing."""

    def __init__(self, gate) -> None:
        super().__init__()
        self.gate = gate

    def generate(self, prompt, sampling, messages, on_text=None):
        if on_text is not None:
            on_text("a")
        self.gate.wait(timeout=10)
        if on_text is not None:
            on_text("ab")
        return Completion("abc", 1, 3, 0)


def test_fork_branches_generate_at_the_same_time():
    backend = Gated(threading.Barrier(4))  # three branches, and the program itself

    @function
    def parallel(s):
        s += "Shared. "
        forks = s.fork(3)
        forks += lambda i: f"Branch {i}: " + gen("out")
        backend.gate.wait(timeout=10)  # the program goes on while all three generate
        forks.join()

    state = parallel.run(backend=backend)
    assert state["out"] == ["abc"] * 3


def test_text_iter_streams_a_gen_while_it_runs():
    backend = Gated(threading.Event())

    @function
    def story(s):
        s += "Once" + gen("tale") + "."

    state = story.run(backend=backend, stream=True)
    pieces = state.text_iter("tale")
    assert next(pieces) == "a"  # before the backend finished the gen
    backend.gate.set()
    assert "".join(pieces) == "bc"
    assert "".join(state.text_iter()) == "Onceabc." == state.text()
    assert state["tale"] == "abc"


def test_a_failure_names_the_line_that_appended_it():
    @function
    def later(s):
        s += "explode " + gen("x")  # the failing line
        s += "more"
        return s["x"]

    line = later.func.__code__.co_firstlineno + 2
    with pytest.raises(ProgramError, match=f"later \\(.*:{line}\\): RuntimeError: the model"):
        later.run(backend=Scripted())
    state = later.run(backend=Scripted(), stream=True)
    with pytest.raises(ProgramError, match=f":{line}\\)"):
        "".join(state.text_iter())
    assert isinstance(state.error(), ProgramError)


def test_a_failing_fork_branch_is_named_at_join():
    @function
    def branches(s):
        forks = s.fork(3)
        forks += ["fine " + gen("a"), "explode " + gen("a"), "fine " + gen("a")]
        forks.join()

    with pytest.raises(ProgramError, match=r"fork branch 1: branches \(.*\): RuntimeError"):
        branches.run(backend=Scripted())

    @function
    def never_joined(s):
        s.fork(2)[1] += "explode " + gen("a")

    with pytest.raises(ProgramError, match="fork branch 1"):
        never_joined.run(backend=Scripted())


def test_join_concatenates_branches_and_returns_values():
    @function
    def concat(s):
        s += "Items:"
        forks = s.fork(2)
        forks += lambda i: f" [{i}]"
        forks.join("concate_and_append")
        s += " done"
        return len(forks)

    state = concat.run(backend=Scripted())
    assert state.text() == "Items: [0] [1] done" and state.ret_value == 2
    with pytest.raises(ProgramError, match="join mode"):
        function(lambda s: s.fork(2).join("zip")).run(backend=Scripted())


def test_importable_without_torch():
    code = "import sys, kvforge.lang; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
