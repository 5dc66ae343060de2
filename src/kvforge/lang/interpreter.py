"""Running programs: ``ProgramState`` (what ``s`` is), ``function`` / ``Program`` (``run``,
``run_batch``), and the ``Backend`` interface the state talks to.

A state executes each appended expression at once (eagerly, in order): text is added to the
prompt, a chat turn adds the backend's role markers around its content, ``gen`` asks the backend
to continue the text so far, ``select`` asks it to score each choice after the text so far.
Every request extends the previous one's text, so a backend with a prefix cache computes the
shared part once.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kvforge.lang.ir import Concat, Expr, Gen, RoleBegin, RoleEnd, Select, Text, as_expr


@dataclass
class Completion:
    """A backend's answer to a generate or select call."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # select: each choice's token-length-normalised log-probability
    scores: list[float] = field(default_factory=list)


class Backend:
    """What a state needs from a model: its chat markers, generation and choice scoring."""

    def role_prefix(self, role: str) -> str:
        """Text that opens a ``role`` turn in the model's chat format."""
        raise NotImplementedError

    def role_suffix(self, role: str) -> str:
        """Text that closes a ``role`` turn."""
        raise NotImplementedError

    def generate(
        self, prompt: str, sampling: dict[str, Any], messages: list[dict[str, str]]
    ) -> Completion:
        """Continue ``prompt`` under the OpenAI-style ``sampling`` options (``messages``: the
        same conversation as chat turns, the open one last, for chat-only backends)."""
        raise NotImplementedError

    def select(self, prompt: str, choices: list[str], messages: list[dict[str, str]]) -> Completion:
        """Score every choice as a continuation of ``prompt``; ``text`` is the best one."""
        raise NotImplementedError


class ProgramError(RuntimeError):
    """A program failed; the message names the program and the line that failed."""


_default: list[Backend | None] = [None]


def set_default_backend(backend: Backend) -> None:
    """The backend ``run`` and ``run_batch`` use when none is passed."""
    _default[0] = backend


class ProgramState:
    """The ``s`` of a program: its text so far, chat messages, variables and token counts."""

    def __init__(self, backend: Backend, defaults: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.defaults = defaults or {}  # sampling options of gen calls that do not set them
        self._text = ""
        self._messages: list[dict[str, str]] = []
        self._role: str | None = None
        self._role_start = 0
        self.variables: dict[str, str] = {}
        self.meta: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        self._chunks: list[str] = []  # appended text, in order (text_iter)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ program side
    def __iadd__(self, other: object) -> ProgramState:
        self._run(as_expr(other))
        return self

    def __getitem__(self, name: str) -> str:
        return self.variables[name]

    def fork(self, count: int) -> ForkGroup:
        """``count`` copies of this state that continue separately from the same text (a
        backend with a prefix cache computes that text once)."""
        if not isinstance(count, int) or count < 1:
            raise ValueError("fork needs a positive number of branches")
        return ForkGroup([self._copy() for _ in range(count)])

    # ------------------------------------------------------------- results
    def text(self) -> str:
        """The whole text so far, chat markers included."""
        return self._text

    def messages(self) -> list[dict[str, str]]:
        """The closed chat turns, as OpenAI-style messages."""
        return [dict(m) for m in self._messages]

    def text_iter(self) -> Iterator[str]:
        """The appended pieces of text in order (the state runs eagerly: they are all here)."""
        yield from list(self._chunks)

    def cached_ratio(self) -> float:
        """Share of prompt tokens the backend found cached."""
        prompt = self.meta["prompt_tokens"]
        return self.meta["cached_tokens"] / prompt if prompt else 0.0

    # ------------------------------------------------------------ execution
    def _append(self, text: str) -> None:
        self._text += text
        self._chunks.append(text)

    def _run(self, expr: Expr) -> None:
        if isinstance(expr, Concat):
            for part in expr.parts:
                self._run(part)
        elif isinstance(expr, Text):
            self._append(expr.text)
        elif isinstance(expr, RoleBegin):
            if self._role is not None:
                raise ValueError(f"a {expr.role} turn cannot open inside a {self._role} turn")
            self._append(self.backend.role_prefix(expr.role))
            self._role, self._role_start = expr.role, len(self._text)
        elif isinstance(expr, RoleEnd):
            if self._role != expr.role:
                raise ValueError(f"no open {expr.role} turn to close")
            content = self._text[self._role_start :]
            self._messages.append({"role": expr.role, "content": content})
            self._append(self.backend.role_suffix(expr.role))
            self._role = None
        elif isinstance(expr, Gen):
            sampling = {**self.defaults, **expr.sampling()}
            result = self.backend.generate(self._text, sampling, self._conversation())
            self._record(expr.name, result)
        elif isinstance(expr, Select):
            result = self.backend.select(self._text, expr.choices, self._conversation())
            self._record(expr.name, result)
        else:
            raise TypeError(f"unknown expression {type(expr).__name__}")

    def _conversation(self) -> list[dict[str, str]]:
        """The closed turns plus the open one (its text so far)."""
        messages = self.messages()
        if self._role is not None:
            messages.append({"role": self._role, "content": self._text[self._role_start :]})
        return messages

    def _record(self, name: str | None, result: Completion) -> None:
        for key in self.meta:
            self.meta[key] += getattr(result, key)
        if name is not None:
            self.variables[name] = result.text
        self._append(result.text)

    def _copy(self) -> ProgramState:
        other = ProgramState(self.backend, self.defaults)
        other._text, other._messages = self._text, [dict(m) for m in self._messages]
        other._role, other._role_start = self._role, self._role_start
        other.variables = dict(self.variables)
        return other


class ForkGroup(list[ProgramState]):
    """The branches of a fork (a list); ``join`` is where SGLang programs wait for them."""

    def join(self) -> None:
        """Branches run eagerly: nothing to wait for."""

    def __iadd__(self, other: object) -> ForkGroup:  # type: ignore[override, misc]
        for state in self:
            state += other
        return self


class Program:
    """A ``@function``: call it inside another program (nested), or ``run`` it."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __call__(self, s: ProgramState, *args: Any, **kwargs: Any) -> Any:
        return self.func(s, *args, **kwargs)

    def run(
        self,
        *args: Any,
        backend: Backend | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program on a fresh state; ``temperature`` / ``top_p`` / ``top_k`` apply to
        its gen calls that do not set them (as SGLang's run). ProgramError names the line that
        failed."""
        chosen = backend or _default[0]
        if chosen is None:
            raise ValueError("no backend: pass backend= or call set_default_backend first")
        defaults = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        state = ProgramState(chosen, {k: v for k, v in defaults.items() if v is not None})
        try:
            self.func(state, *args, **kwargs)
        except ProgramError:
            raise
        except Exception as exc:
            raise ProgramError(f"{self._where(exc)}: {type(exc).__name__}: {exc}") from exc
        return state

    def run_batch(
        self,
        batch: Sequence[dict[str, Any]],
        backend: Backend | None = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run the program once per keyword set, ``num_threads`` at a time (their requests
        batch together in the engine); states in input order."""
        threads = min(64, max(1, len(batch))) if num_threads == "auto" else int(num_threads)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = [
                pool.submit(self.run, backend=backend, **sampling, **kwargs) for kwargs in batch
            ]
            states = []
            for index, future in enumerate(futures):
                states.append(future.result())
                if progress_bar:
                    print(
                        f"\r{self.func.__name__}: {index + 1}/{len(batch)}", end="", file=sys.stderr
                    )
            if progress_bar:
                print(file=sys.stderr)
        return states

    def _where(self, exc: BaseException) -> str:
        """``name (file:line)`` of the innermost frame of a program in the traceback."""
        where = self.func.__name__
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code in _PROGRAM_CODES:
                where = f"{code.co_name} ({code.co_filename}:{tb.tb_lineno})"
            tb = tb.tb_next
        return where


# code objects of every @function: the frames an error is attributed to
_PROGRAM_CODES: set[Any] = set()


def function(func: Callable[..., Any]) -> Program:
    """Decorate ``def program(s, ...)`` to make it a runnable program."""
    if not callable(func) or not inspect.signature(func).parameters:
        raise TypeError("a program is a function whose first parameter is the state")
    _PROGRAM_CODES.add(func.__code__)
    return Program(func)
